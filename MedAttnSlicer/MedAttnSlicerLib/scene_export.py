# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Saving results the way Slicer users expect. Slicer-side (``slicer``): mixed into ``MedAttnSlicerLogic``.

- ``.seg.nrrd``: Slicer's segmentation file; the segments keep the model's label names and colours and open in
  the Segment Editor as they were.
- DICOM SEG: when the source volume was loaded from Slicer's DICOM database, the segmentation goes into that
  database as a DICOM SEG of the same study, written by Slicer's own ``DICOMSegmentationPlugin`` exporter (in
  Slicer's core from 5.12; on Slicer 5.4-5.10 it comes with the QuantitativeReporting extension).
"""

import os

import slicer

from .errors import MedAttnClientError

__all__ = ["SceneExportMixin", "SEGMENTATION_FILE_SUFFIX", "DICOM_INSTANCE_UIDS_ATTRIBUTE"]

SEGMENTATION_FILE_SUFFIX = ".seg.nrrd"
#: Set by Slicer's DICOMScalarVolumePlugin on volumes loaded from the DICOM database (space-separated UIDs).
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


class SceneExportMixin:
    """Save a segmentation node as ``.seg.nrrd`` or export it as DICOM SEG."""

    @staticmethod
    def saveSegmentation(segmentationNode, path):
        """Save ``segmentationNode`` to ``path`` (``.seg.nrrd`` added when missing); returns the path.

        Like Slicer's Save dialog, the node then refers to this file and counts as saved: the user chose it.
        """
        if segmentationNode is None:
            raise ValueError("Choose the segmentation to save.")
        if not path:
            raise ValueError("Choose a file to save the segmentation to.")
        if not path.lower().endswith(SEGMENTATION_FILE_SUFFIX):
            path += SEGMENTATION_FILE_SUFFIX
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"The folder {folder} does not exist.")
        if not slicer.util.saveNode(segmentationNode, path):
            raise MedAttnClientError(f"Could not save '{segmentationNode.GetName()}' to {path}")
        return path

    @staticmethod
    def dicomInstanceUids(volumeNode):
        """UIDs of the DICOM instances ``volumeNode`` was loaded from when all are in Slicer's DICOM database,
        else an empty list (a volume from a NIfTI/NRRD file, or whose files left the database)."""
        if volumeNode is None:
            return []
        uids = (volumeNode.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None or not database.isOpen:
            return []
        return uids if all(database.fileForInstance(uid) for uid in uids) else []

    def exportDicomSeg(self, segmentationNode, volumeNode, directory):
        """Write ``segmentationNode`` as a DICOM SEG of the study of ``volumeNode`` and add it to the DICOM database.

        ``directory`` receives the file (the database keeps its own copy). The segmentation's geometry reference
        becomes ``volumeNode`` (the exporter takes the source images from it) and its subject hierarchy item moves
        under the volume's study.
        """
        if segmentationNode is None:
            raise ValueError("Choose the segmentation to export.")
        if not self.dicomInstanceUids(volumeNode):
            name = volumeNode.GetName() if volumeNode is not None else "no volume"
            raise ValueError(
                f"DICOM SEG needs the input volume loaded from Slicer's DICOM database; '{name}' was not. "
                "Save the segmentation as .seg.nrrd instead."
            )
        try:
            import DICOMSegmentationPlugin
        except ImportError as error:
            raise MedAttnClientError(
                "Exporting DICOM SEG needs Slicer 5.12 or newer, or the QuantitativeReporting extension "
                "(Extensions Manager) on Slicer 5.4-5.10."
            ) from error
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        segmentationItem = shNode.GetItemByDataNode(segmentationNode)
        shNode.SetItemParent(segmentationItem, studyItem)
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(segmentationItem)
        if not exportables:
            raise MedAttnClientError(f"Slicer's DICOM SEG exporter cannot export '{segmentationNode.GetName()}'.")
        for exportable in exportables:
            exportable.directory = directory
        error = exporter.export(exportables)
        if error:
            raise MedAttnClientError(f"DICOM SEG export of '{segmentationNode.GetName()}' failed: {error}")
        return directory
