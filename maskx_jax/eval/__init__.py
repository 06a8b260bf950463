"""Evaluation and pictures: detections -> COCO results (``coco_results``), pycocotools AP for all classes, set A
and set B (``coco_eval``), a detector's run over evaluation batches (``run``), detections drawn on their images
(``pictures``) and ``maskx-evaluate`` (``cli``). Each module is usable alone; nothing is imported here."""
