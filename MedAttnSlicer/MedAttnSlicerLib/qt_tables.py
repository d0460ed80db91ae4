# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Filling the panel's tables and combo boxes. Slicer-side (``qt``); the rows and texts come from
:mod:`.formatting`."""

import qt

from . import formatting
from .model_card import default_model

__all__ = ["setupTable", "fillTable", "fillCombo", "fillModelCombo"]


def setupTable(table, headers):
    """Read-only table with ``headers`` and no rows."""
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(0)
    table.horizontalHeader().setStretchLastSection(True)
    table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)


def fillTable(table, headers, rows, colors=None):
    """Replace the table's rows; ``colors[i]`` (r, g, b in [0, 1] or None) paints row i's first cell."""
    table.clearContents()
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(len(rows))
    for rowIndex, row in enumerate(rows):
        for columnIndex, text in enumerate(row):
            item = qt.QTableWidgetItem(str(text))
            if colors and columnIndex == 0 and colors[rowIndex] is not None:
                r, g, b = colors[rowIndex]
                item.setBackground(qt.QBrush(qt.QColor(int(255 * r), int(255 * g), int(255 * b))))
                item.setForeground(qt.QBrush(qt.QColor("black")))
            table.setItem(rowIndex, columnIndex, item)
    table.resizeColumnsToContents()


def fillCombo(combo, names, current=None):
    """Replace the items; select ``current`` when it is one of them."""
    combo.clear()
    names = list(names)
    combo.addItems(names)
    if current in names:
        combo.setCurrentIndex(names.index(current))


def fillModelCombo(combo, cards, task, current=None):
    """One entry per model card (picker text, card as tooltip); selects ``current`` (a model name the scene
    remembers) when the server still offers it, else the server's default model for ``task``."""
    combo.clear()
    for card in cards:
        combo.addItem(formatting.model_picker_text(card))
        combo.setItemData(combo.count - 1, formatting.model_card_text(card), qt.Qt.ToolTipRole)
    names = [card.name for card in cards]
    chosen = cards[names.index(current)] if current in names else default_model(cards, task)
    if chosen is not None:
        combo.setCurrentIndex(cards.index(chosen))
