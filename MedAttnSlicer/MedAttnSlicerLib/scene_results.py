# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Results in the MRML scene: server label maps as segmentation nodes, over/under overlays, heat maps, copies of
the user's volumes for upload. Slicer-side (imports ``slicer`` and ``vtk``): mixed into ``MedAttnSlicerLogic``.

Every method runs on the main thread. The maths and colours come from the Slicer-free modules of this package
(:mod:`.labels`, :mod:`.overlay`, :mod:`.heatmap`); here they only go into nodes. Two rules hold throughout:
the user's nodes are never re-pointed or modified (uploads are copies written by ``slicer.util.exportNode``),
and results sit under the parent transform of the volume they were computed from.
"""

import os
import time

import numpy as np
import slicer
import vtk

from .errors import MedAttnClientError
from .heatmap import explanation_title, heat_map_colors, heat_map_from_saliency, heat_map_indices
from .labels import compose_label_map, split_label_map
from .overlay import overlay_from_comparison_map, overlay_from_masks

__all__ = ["SceneResultsMixin", "IMAGE_ID_ATTRIBUTE", "MODEL_ATTRIBUTE", "HEAT_MAP_COLOR_NODE_NAME", "HEAT_MAP_COLORS"]

IMAGE_ID_ATTRIBUTE = "MedAttnSlicer.ImageId"
MODEL_ATTRIBUTE = "MedAttnSlicer.Model"
#: The heat-map colour node (cold-to-hot from MedAttnSlicerLib.heatmap; entry 0 = not explained, transparent).
HEAT_MAP_COLOR_NODE_NAME = "MedAttnSlicer heat map"
HEAT_MAP_COLORS = 256


class SceneResultsMixin:
    """MRML side of ``MedAttnSlicerLogic``; needs ``self.tempDir`` (Slicer's temporary folder for this module)."""

    def loadImage(self, path, imageId, name=None):
        """Load a downloaded datastore image, remember its id, show it."""
        volumeNode = slicer.util.loadVolume(path, {"name": name or imageId, "show": False})
        volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=None, fit=True)
        return volumeNode

    @staticmethod
    def imageIdOf(volumeNode):
        """Datastore id of a volume loaded by Next sample or submitted before, else None."""
        return volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE) if volumeNode else None

    def writeVolume(self, volumeNode, directory=None):
        """Write a copy of a volume as NIfTI (to send it to the server); returns the path.

        The node is left alone: saveNode would point the user's volume at this temporary file and mark
        it saved, so the next scene save would skip it and refer to a deleted file. exportNode writes
        through a temporary scene instead. Local (untransformed) coordinates: results are placed under
        the volume's parent transform (placeUnderTransformOf).
        """
        path = os.path.join(
            directory or self.tempDir, f"{fileSafe(volumeNode.GetName())}-{int(time.time() * 1000)}.nii.gz"
        )
        # A fresh properties dict: exportNode stores the file format in it, and its default {} is shared.
        if not slicer.util.exportNode(volumeNode, path, {}, world=False):
            raise MedAttnClientError(f"Could not write volume '{volumeNode.GetName()}' to {path}")
        return path

    def imageSource(self, volumeNode, directory=None):
        """(image id, None) for datastore volumes, else (None, a NIfTI copy written for upload)."""
        imageId = self.imageIdOf(volumeNode)
        return (imageId, None) if imageId else (None, self.writeVolume(volumeNode, directory))

    @staticmethod
    def placeUnderTransformOf(node, sourceNode):
        """Put a result under the parent transform of the volume it was computed from.

        The server works in the volume's local coordinates, so results only line up with the volume
        when they share its transform (linear or not).
        """
        node.SetAndObserveTransformNodeID(sourceNode.GetTransformNodeID() if sourceNode is not None else None)
        return node

    @staticmethod
    def spacingOf(volumeNode):
        """Voxel spacing in numpy (K, J, I) axis order, as the lib expects."""
        return tuple(reversed(volumeNode.GetSpacing()))

    # ------------------------------------------------------------------ segmentations
    def segmentationFromLabelFile(self, labelPath, volumeNode, labels, name):
        """Load a server label map as a segmentation node, one named segment per model label."""
        labelNode = slicer.util.loadLabelVolume(labelPath, {"name": "__MedAttnSlicer_label__", "show": False})
        try:
            labelArray = slicer.util.arrayFromVolume(labelNode)
            segments = split_label_map(labelArray, labels, include_absent=True)
            segmentationNode = self._newSegmentationNode(name, volumeNode, volumeNode)
            for segment in segments:
                segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    (labelArray == segment.value).astype(np.uint8), segmentationNode, segmentId, labelNode
                )
        finally:
            self.removeNode(labelNode)
        return segmentationNode

    def overlayFromSegments(self, predictionNode, predictionSegmentId, referenceNode, referenceSegmentId, volumeNode):
        """Over/under overlay of two segments in the scene, on the grid of ``volumeNode``."""
        if not predictionNode or not predictionSegmentId:
            raise ValueError("Choose the prediction segment to compare.")
        if not referenceNode or not referenceSegmentId:
            raise ValueError("Choose the reference segment to compare with.")
        if volumeNode is None:
            raise ValueError("Choose the input volume (it sets the grid the segments are compared on).")
        if predictionNode == referenceNode and predictionSegmentId == referenceSegmentId:
            raise ValueError("The prediction and the reference are the same segment.")
        prediction = slicer.util.arrayFromSegmentBinaryLabelmap(predictionNode, predictionSegmentId, volumeNode)
        reference = slicer.util.arrayFromSegmentBinaryLabelmap(referenceNode, referenceSegmentId, volumeNode)
        referenceName = referenceNode.GetSegmentation().GetSegment(referenceSegmentId).GetName()
        return overlay_from_masks(
            prediction, reference, self.spacingOf(volumeNode), reference_name=f"segment '{referenceName}'"
        )

    def overlayFromComparisonFile(self, path, figures, referenceName):
        """Load the server's comparison map; returns (overlay, labelNode holding its geometry)."""
        labelNode = slicer.util.loadLabelVolume(path, {"name": "__MedAttnSlicer_comparison__", "show": False})
        overlay = overlay_from_comparison_map(
            slicer.util.arrayFromVolume(labelNode), self.spacingOf(labelNode), referenceName, figures
        )
        return overlay, labelNode

    def showOverlay(self, overlay, geometryNode, name, transformSource=None):
        """Agreement (white), Over-segmentation (green), Under-segmentation (red) as a segmentation node.

        Placed under the parent transform of ``transformSource`` (default ``geometryNode``).
        """
        segmentationNode = self._newSegmentationNode(name, geometryNode, transformSource or geometryNode)
        for segment in overlay.segments:
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segment.name, list(segment.color))
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                segment.mask(overlay.comparison), segmentationNode, segmentId, geometryNode
            )
        displayNode = segmentationNode.GetDisplayNode()
        displayNode.SetOpacity2DFill(0.45)
        displayNode.SetOpacity2DOutline(1.0)
        return segmentationNode

    def exportSegmentationToLabelFile(self, segmentationNode, volumeNode, labels, directory=None):
        """Write every segment into one NIfTI label map on the volume's grid (model label values)."""
        if segmentationNode is None:
            raise ValueError("Choose the segmentation to submit.")
        if volumeNode is None:
            raise ValueError("Choose the input volume the segmentation belongs to.")
        segmentation = segmentationNode.GetSegmentation()
        masks = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            masks.append(
                (
                    segmentation.GetSegment(segmentId).GetName(),
                    slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode),
                )
            )
        labelArray = compose_label_map(masks, labels)
        labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MedAttnSlicer_export__")
        try:
            labelNode.CopyOrientation(volumeNode)
            slicer.util.updateVolumeFromArray(labelNode, labelArray)
            path = os.path.join(
                directory or self.tempDir, f"{fileSafe(segmentationNode.GetName())}-{int(time.time() * 1000)}.nii.gz"
            )
            # saveNode is fine here: the label node is ours and removed right after.
            if not slicer.util.saveNode(labelNode, path):
                raise MedAttnClientError(f"Could not write the label map to {path}")
        finally:
            self.removeNode(labelNode)
        return path

    def showSaliency(self, path, volumeNode, method="rise", sliceIndex=None, opacity=0.5):
        """The server's saliency map as a heat-map foreground over ``volumeNode``; jumps to its peak.

        MedAttnSlicerLib rescales the float map over the classified slice and turns it into colour-table
        indices (0 = not explained, kept transparent); here they only go into a volume and a colour node.
        Returns (heat-map volume node, HeatMap).
        """
        saliencyNode = slicer.util.loadVolume(path, {"name": f"{volumeNode.GetName()} saliency", "show": False})
        # The file goes with its job folder: the node must not refer to it (a scene save then writes it anew).
        storageNode = saliencyNode.GetStorageNode()
        if storageNode is not None:
            saliencyNode.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storageNode)
        self.placeUnderTransformOf(saliencyNode, volumeNode)
        directions = vtk.vtkMatrix4x4()
        saliencyNode.GetIJKToRASDirectionMatrix(directions)
        direction = [directions.GetElement(row, column) for row in range(3) for column in range(3)]
        heatMap = heat_map_from_saliency(slicer.util.arrayFromVolume(saliencyNode), method, direction, sliceIndex)
        slicer.util.updateVolumeFromArray(saliencyNode, heat_map_indices(heatMap, HEAT_MAP_COLORS))
        saliencyNode.SetName(f"{volumeNode.GetName()} {explanation_title(heatMap.method)}")

        displayNode = saliencyNode.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(self.heatMapColorNode().GetID())
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0, HEAT_MAP_COLORS - 1)
        displayNode.SetInterpolate(False)
        displayNode.AutoThresholdOff()
        displayNode.SetThreshold(0.5, HEAT_MAP_COLORS)  # index 0 (not explained) stays transparent
        displayNode.ApplyThresholdOn()
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=saliencyNode, foregroundOpacity=opacity)

        ijkToRas = vtk.vtkMatrix4x4()
        saliencyNode.GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint([float(index) for index in reversed(heatMap.peak)] + [1.0])
        world = [0.0, 0.0, 0.0]
        saliencyNode.TransformPointToWorld(list(ras[:3]), world)  # slice views show world coordinates
        slicer.modules.markups.logic().JumpSlicesToLocation(world[0], world[1], world[2], True)
        return saliencyNode, heatMap

    @staticmethod
    def heatMapColorNode():
        """The cold-to-hot colour table of heat maps (created once per scene)."""
        colorNode = slicer.mrmlScene.GetFirstNodeByName(HEAT_MAP_COLOR_NODE_NAME)
        if colorNode is not None:
            return colorNode
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_MAP_COLOR_NODE_NAME)
        colorNode.SetTypeToUser()
        colorNode.HideFromEditorsOn()
        colors = heat_map_colors(HEAT_MAP_COLORS)
        colorNode.SetNumberOfColors(len(colors))
        for index, (red, green, blue, alpha) in enumerate(colors):
            colorNode.SetColor(index, str(index), float(red), float(green), float(blue), float(alpha))
        return colorNode

    @classmethod
    def _newSegmentationNode(cls, name, geometryNode, transformSource):
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(geometryNode)
        return cls.placeUnderTransformOf(segmentationNode, transformSource)

    @staticmethod
    def removeNode(node):
        """Remove a node we added (a temporary label map) with its display and storage nodes.

        Removing only the node would leave its display nodes in the scene as orphans.
        """
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            return
        helpers = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
        helpers.append(node.GetStorageNode())
        slicer.mrmlScene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and slicer.mrmlScene.IsNodePresent(helper):
                slicer.mrmlScene.RemoveNode(helper)


def fileSafe(text):
    """``text`` as a file name stem (letters, digits, ``-_.``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in (text or "volume")) or "volume"


def requireInScene(node, what):
    """Raise a readable error when ``node`` left the scene while a server job ran."""
    if node is None or not slicer.mrmlScene.IsNodePresent(node):
        raise MedAttnClientError(f"The {what} was removed from the scene while the server was working.")
