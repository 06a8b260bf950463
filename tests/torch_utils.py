"""Helpers shared by the parity tests (torch lives only in tests/, benchmarks/ and convert/)."""
from __future__ import annotations

import numpy as np
import torch


def randomize_batchnorm_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every (Frozen)BatchNorm non-trivial statistics so a parity test exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "running_mean") and hasattr(mod, "running_var") and mod.running_mean is not None:
                n = mod.running_mean.shape[0]
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def calibrate_maskrcnn_(model: torch.nn.Module, images: list[torch.Tensor], seed: int = 0) -> None:
    """Rescale a randomly initialised torchvision Mask R-CNN so it detects like a trained one.

    Random weights give degenerate detections (one class everywhere, boxes flung onto the border).
    On ``images`` (CHW float in [0, 1]), in place and in eval mode:
      * RPN objectness logits get std 3 and box deltas std 0.2 (zero bias): well-spread proposal
        scores and proposals that stay near their anchors;
      * ``cls_score`` is rescaled so each class logit varies with std 1.5 across RoIs, with bias
        minus the mean logit plus N(0, 0.3): scores spread over ~[0.5, 0.95] for many classes;
      * ``bbox_pred`` is scaled so box deltas have std 0.3.
    """
    captured: dict = {}
    hooks = [model.roi_heads.box_head.register_forward_hook(lambda mod, inp, out: captured.setdefault("rep", out)),
             model.rpn.head.register_forward_hook(lambda mod, inp, out: captured.setdefault("rpn", out))]
    predictor, rpn_head = model.roi_heads.box_predictor, model.rpn.head
    model.eval()
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            # The RPN first: the box head sees its proposals.
            model(images)
            logits, deltas = (torch.cat([t.flatten() for t in ts]) for ts in captured.pop("rpn"))
            rpn_head.cls_logits.weight.mul_(3.0 / logits.std())
            rpn_head.bbox_pred.weight.mul_(0.2 / deltas.std())
            rpn_head.bbox_pred.bias.zero_()
            captured.clear()
            model(images)
            rep = captured["rep"]
            mean = rep.mean(0)
            w = predictor.cls_score.weight
            w.mul_(1.5 / ((rep - mean) @ w.T).std(0)[:, None])
            num_classes = w.shape[0]
            predictor.cls_score.bias.copy_(-(w @ mean) + 0.3 * torch.randn(num_classes, generator=g))
            predictor.bbox_pred.weight.mul_(0.3 / (rep @ predictor.bbox_pred.weight.T).std())
    finally:
        for h in hooks:
            h.remove()
