"""Adapters that pull the tensors of the detection KD losses out of unmodified detectors.

``torchvision_faster_rcnn`` imports torchvision only when its model-running function is
called; its tensor-level helpers are plain PyTorch. The GFL / ATSS head of
:mod:`kdkernels.distill.detection.gfl_detector` exposes its tensors directly (capture paths
``head.cls_out``, ``head.reg_out``, ``head.distances``).
"""
