# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Server part of the panel: connect (and log in when the server asks), then the model pickers.
Slicer-side (Qt widgets): mixed into ``MedAttnSlicerWidget``, which provides ``self.ui``, ``self.logic``,
``self.parameters`` (the parameter node), ``startJob``, ``userAction`` and ``showMessage``.

The password is read from its field for the Connect job and the field is cleared at once; the token the server
returns stays in the Logic's client, in memory only (never in the scene, the settings or a file).
"""

import qt

from . import formatting
from .errors import MedAttnClientError
from .heatmap import explanation_title
from .model_card import CLASSIFICATION, SEGMENTATION
from .qt_tables import fillCombo, fillModelCombo

__all__ = ["ServerPanelMixin", "SETTINGS_SERVER_URLS"]

SETTINGS_SERVER_URLS = "MedAttnSlicer/serverUrls"


class ServerPanelMixin:
    """Slots of the Server and Models sections."""

    # ------------------------------------------------------------------ connect and log in
    def onConnect(self):
        with self.userAction("Could not connect."):
            self._requireIdle()
            url = self.urlHistory.add(self.ui.serverComboBox.currentText)
            username = self.ui.usernameLineEdit.text.strip()
            password = self.ui.passwordLineEdit.text
            self.ui.passwordLineEdit.clear()  # used once by this job, never kept
            self.logic.setServer(url)
            self.startJob(
                "Connect", self.logic.connect, username, password, onFinished=lambda info: self.onConnected(url, info)
            )

    def onConnected(self, url, info):
        self.parameters.serverUrl = url
        qt.QSettings().setValue(SETTINGS_SERVER_URLS, self.urlHistory.to_setting())
        fillCombo(self.ui.serverComboBox, self.urlHistory.urls, url)
        user = f" as {self.ui.usernameLineEdit.text.strip()}" if self.logic.loggedIn else ""
        self.ui.serverStatusLabel.setText(f"Connected to {url}{user}")
        self.ui.appStatusLabel.setText(formatting.app_status_text(info))

        self.segCards = self.logic.modelCards(SEGMENTATION)
        self.clsCards = self.logic.modelCards(CLASSIFICATION)
        fillModelCombo(self.ui.segModelComboBox, self.segCards, SEGMENTATION, self.parameters.segmentationModel)
        fillModelCombo(self.ui.clsModelComboBox, self.clsCards, CLASSIFICATION, self.parameters.classificationModel)
        fillCombo(self.ui.strategyComboBox, (info.get("strategies") or {}).keys())
        fillCombo(self.ui.trainTaskComboBox, (info.get("trainers") or {}).keys())
        fillCombo(self.ui.scoringMethodComboBox, (info.get("scoring") or {}).keys())
        self.onSegModelChanged()
        self.onClsModelChanged()
        self._showTrainStats(info)
        self.showMessage(f"Connected: {formatting.app_status_text(info)}")

    def _showTrainStats(self, info):
        stats = info.get("train_stats") or {}
        task = self.ui.trainTaskComboBox.currentText
        if task and stats.get(task):
            self.ui.trainStatusLabel.setText(formatting.training_text(task, "last run", stats[task]))

    # ------------------------------------------------------------------ model choice
    def currentSegCard(self):
        index = self.ui.segModelComboBox.currentIndex
        if not self.segCards or index < 0:
            raise MedAttnClientError("The server offers no segmentation model.")
        return self.segCards[index]

    def currentClsCard(self):
        index = self.ui.clsModelComboBox.currentIndex
        if not self.clsCards or index < 0:
            raise MedAttnClientError("The server offers no classification model.")
        return self.clsCards[index]

    @staticmethod
    def _chosenCard(comboBox, cards):
        """The card chosen in ``comboBox``, None when there is none."""
        index = comboBox.currentIndex
        return cards[index] if 0 <= index < len(cards) else None

    def onSegModelChanged(self):
        with self.userAction("Could not show the model."):
            card = self._chosenCard(self.ui.segModelComboBox, self.segCards)
            self.ui.segModelCardLabel.setText(formatting.model_card_text(card) if card else "")
            if card:
                self.parameters.segmentationModel = card.name
            self.updateButtons()

    def onClsModelChanged(self):
        with self.userAction("Could not show the model."):
            card = self._chosenCard(self.ui.clsModelComboBox, self.clsCards)
            self.ui.clsModelCardLabel.setText(formatting.model_card_text(card) if card else "")
            if card:
                self.parameters.classificationModel = card.name
            # the methods this classifier offers (/info/ "explanations"; RISE when the server lists none)
            self.ui.explanationComboBox.clear()
            for method in card.explanations if card else []:
                self.ui.explanationComboBox.addItem(explanation_title(method))
            if card and card.default_explanation in card.explanations:
                self.ui.explanationComboBox.setCurrentIndex(card.explanations.index(card.default_explanation))
            self.updateButtons()
