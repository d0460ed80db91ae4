# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Training and scoring part of the panel. Slicer-side (Qt widgets): mixed into ``MedAttnSlicerWidget``.

A training is followed by a job of its own (not the one-at-a-time foreground job), so the user can segment while
the server trains; Stop ends only a training this panel started (closing the module leaves it running).
"""

from . import formatting, workflows
from .qt_tables import fillTable

__all__ = ["TrainingPanelMixin"]


class TrainingPanelMixin:
    """Slots of the Training and Scoring sections."""

    # ------------------------------------------------------------------ training
    def onTrain(self):
        with self.userAction("Could not start training."):
            client = self.logic.requireClient()
            task = self.ui.trainTaskComboBox.currentText
            params = {"max_epochs": int(self.ui.maxEpochsSpinBox.value)}
            self.trainJob = self.logic.runner.submit(
                f"Train {task}",
                workflows.run_training,
                client,
                task,
                params,
                on_progress=self.onTrainProgress,
                on_finished=self.onTrainFinished,
                on_failed=self.onTrainEnded,
                on_cancelled=self.onTrainEnded,
                transfers=False,  # follows the server's training for minutes: relaxed polling
            )
            self.ui.trainProgressBar.setRange(0, 0)
            self.ui.trainStatusLabel.setText(f"Starting training '{task}'...")
            self._startPolling()
            self.updateButtons()

    def onStopTrain(self):
        with self.userAction("Could not stop training."):
            if self.trainJob is not None and not self.trainJob.done:
                self.trainJob.cancel("Training stopped by the user.")
                self.ui.trainStatusLabel.setText("Stopping training on the server...")

    def onTrainProgress(self, event):
        if event.fraction is None:
            self.ui.trainProgressBar.setRange(0, 0)
        else:
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.setValue(int(round(100 * event.fraction)))
        self.ui.trainStatusLabel.setText(event.message)

    def onTrainFinished(self, event):
        outcome = event.result
        self.ui.trainProgressBar.setRange(0, 100)
        self.ui.trainProgressBar.setValue(100)
        text = formatting.training_text(outcome.task, outcome.status, outcome.stats)
        self.ui.trainStatusLabel.setText(text)
        self.showMessage(f"Training finished: {text}. The server republished the FP32 and INT8 models.")
        self.updateButtons()

    def onTrainEnded(self, event):
        self.ui.trainProgressBar.setRange(0, 100)
        self.ui.trainProgressBar.setValue(0)
        if event.kind == "failed":
            self.ui.trainStatusLabel.setText(formatting.error_text(event.error))
            self.showError(event.error, event.traceback)
        else:
            self.ui.trainStatusLabel.setText(event.message)
            self.showMessage(event.message)
        self.updateButtons()

    # ------------------------------------------------------------------ scoring
    def onScore(self):
        with self.userAction("Could not start scoring."):
            client = self.logic.requireClient()
            method = self.ui.scoringMethodComboBox.currentText
            self.ui.scoresSummaryLabel.setText(f"Scoring {method} on every image...")
            self.startJob(
                f"Scoring {method}",
                workflows.run_scoring,
                client,
                method,
                onFinished=lambda ds: self.onScored(ds, method),
                transfers=False,
            )

    def onScored(self, datastore, method):
        rows = formatting.score_rows(datastore, method)
        fillTable(self.ui.scoresTable, formatting.score_headers(method), rows)
        summary = formatting.score_summary_text(datastore, method)
        self.ui.scoresSummaryLabel.setText(summary)
        self.showMessage(f"Scoring done: {summary}.")
