"""One benchmark case per function; each runs in its own process (see ``run.py``) so that its peak
resident memory is its own. Every function returns a flat dict (one row of the JSON).

Cases, maskx_jax ("jax") and torchvision ("torch") on the same weights and inputs:
  * ``matmul_peak``: float32 [N, N] @ [N, N] GFLOP/s of this machine through JAX (the yardstick of
    the utilisation column).
  * ``roi_align``: FPN multi-scale RoIAlign forward and forward+backward (the gradient w.r.t. the
    features) at Mask R-CNN sizes: P2-P5 of an 800 x 1344 padded batch of 2, 256 channels,
    512 RoIs per image (log-uniform sizes 16..800 px, so every level is used), 7 x 7 or 14 x 14,
    sampling ratio 2, aligned=False (torchvision's ``MultiScaleRoIAlign`` over its compiled
    ``roi_align`` kernel).
  * ``inference``: uint8 images -> detections with masks pasted at the image size (torchvision's
    ``model(images)`` end to end; maskx_jax ``preprocess`` + jitted ``predict`` + jitted paste).
  * ``kernels``: float32 GFLOP/s of single convolutions / matrix products at training-step sizes
    (forward, input gradient, filter gradient): the ceiling the train row works under.
  * ``train``: one optimisation step (forward, losses, backward, SGD update) of Mask R-CNN R50-FPN
    (frozen BN, stem + layer1 frozen as torchvision's default), batch 2, 8 instances per image.
Compile time (maskx_jax's ahead-of-time ``lower().compile()``) is reported separately from run time.
"""
from __future__ import annotations

import numpy as np

from benchmarks.common import isolate_jax, peak_rss_mib, timed, xla_figures
from benchmarks.reference import COCO_CLASSES, converted, smooth_images, torch_images, torch_maskrcnn, train_targets

FPN_SHAPES = ((200, 336), (100, 168), (50, 84), (25, 42))  # P2..P5 of an 800 x 1344 padded image
FPN_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _time_now():
    import time

    return time.perf_counter()


# --------------------------------------------------------------------------------------- matmul


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp

    isolate_jax()
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda x: x @ x)
    t = timed(lambda: jax.block_until_ready(f(a)), repeats, warmup=2)
    return {"gflops": 2 * n**3 / t["median_s"] / 1e9, "n": n, **t}


# ------------------------------------------------------------------------------------ roi align


def _roi_inputs(batch: int, rois: int, out: int, channels: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((batch, h, w, channels), dtype=np.float32) for h, w in FPN_SHAPES]
    side = np.exp(rng.uniform(np.log(16), np.log(800), (batch, rois)))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (batch, rois)))
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    cx, cy = rng.uniform(0, 1333, (batch, rois)), rng.uniform(0, 800, (batch, rois))
    boxes = np.stack([np.clip(cx - bw / 2, 0, 1333), np.clip(cy - bh / 2, 0, 800),
                      np.clip(cx + bw / 2, 0, 1333), np.clip(cy + bh / 2, 0, 800)], -1).astype(np.float32)
    cotangent = rng.standard_normal((batch, rois, out, out, channels), dtype=np.float32)
    return feats, boxes, cotangent


def roi_align(framework: str, out: int, batch: int = 2, rois: int = 512, channels: int = 256,
              repeats: int = 5) -> dict:
    feats, boxes, cot = _roi_inputs(batch, rois, out, channels)
    row = {"out": out, "batch": batch, "rois_per_image": rois, "channels": channels}
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        from maskx_jax.roi_align import multiscale_roi_align

        isolate_jax()

        def forward(fs, bx):
            return multiscale_roi_align(fs, bx, out, 2, False, FPN_SCALES)

        def loss(fs, bx, ct):
            return jnp.sum(forward(fs, bx) * ct)

        args = ([jnp.asarray(f) for f in feats], jnp.asarray(boxes), jnp.asarray(cot))
        t0 = _time_now()
        fwd = jax.jit(forward).lower(*args[:2]).compile()
        # value_and_grad: the loss is linear in the features, so a bare grad would skip the forward.
        both = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
        row["compile_s"] = _time_now() - t0
        row["forward"] = timed(lambda: jax.block_until_ready(fwd(*args[:2])), repeats)
        row["forward_backward"] = timed(lambda: jax.block_until_ready(both(*args)), repeats)
        row["xla"] = xla_figures(both)
    else:
        from collections import OrderedDict

        import torch
        import torchvision

        pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], out, 2)
        tf = OrderedDict((str(i), torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().requires_grad_(True))
                         for i, f in enumerate(feats))
        tb = [torch.from_numpy(b) for b in boxes]
        tc = torch.from_numpy(cot).reshape(batch * rois, out, out, channels).permute(0, 3, 1, 2).contiguous()
        sizes = [(800, 1344)] * batch

        def forward():
            with torch.no_grad():
                pool(tf, tb, sizes)

        def forward_backward():
            for f in tf.values():
                f.grad = None
            (pool(tf, tb, sizes) * tc).sum().backward()

        row["forward"] = timed(forward, repeats)
        row["forward_backward"] = timed(forward_backward, repeats)
    row["peak_rss_mib"] = peak_rss_mib()
    return row


# ------------------------------------------------------------------------------------ inference


def inference(framework: str, height: int, width: int, batch: int, repeats: int = 3,
              score_thresh: float = 0.05, exact_canvas: bool = True) -> dict:
    """Images of exactly height x width; the model resizes with min_size=min(h, w), max_size=max(h, w).

    ``score_thresh``: both detectors' box score threshold (0.05 = torchvision's default, where the
    calibrated random weights give ~100 detections/image; higher keeps fewer detections, and both
    run their mask heads on fewer boxes). ``exact_canvas``: maskx_jax's ``model.exact_canvas`` (what the
    per-image extent costs; the images fill the canvas here, so both settings detect the same)."""
    min_size, max_size = min(height, width), max(height, width)
    images = smooth_images(batch, height, width, seed=1)
    model = torch_maskrcnn(min_size, max_size, smooth_images(1, height, width, seed=2)[0])
    model.roi_heads.score_thresh = score_thresh
    row = {"height": height, "width": width, "batch": batch, "score_thresh": score_thresh}
    if not exact_canvas:
        row["exact_canvas"] = False
    if framework == "jax":
        import dataclasses

        import jax
        from flax import nnx

        from maskx_jax.detector import make_predict_fn
        from maskx_jax.paste import paste_masks_batched
        from maskx_jax.transform import preprocess, resize_boxes

        isolate_jax()
        ours = converted(model)
        del model
        ours.cfg = dataclasses.replace(ours.cfg, box_score_thresh=score_thresh, exact_canvas=exact_canvas)
        predict = make_predict_fn(ours)
        _, state = nnx.split(ours)
        pre = preprocess(images, min_size=min_size, max_size=max_size)
        t0 = _time_now()
        compiled = predict.jitted.lower(state, pre.images, pre.image_sizes).compile()
        compile_predict = _time_now() - t0
        det = compiled(state, pre.images, pre.image_sizes)
        boxes = resize_boxes(np.asarray(det.boxes), pre.image_sizes, pre.original_sizes)
        t0 = _time_now()
        paste = paste_masks_batched.lower(det.masks, boxes, height=height, width=width).compile()
        row["compile_s"] = compile_predict + _time_now() - t0
        row["compile_predict_s"] = compile_predict
        detections = []

        def run():
            p = preprocess(images, min_size=min_size, max_size=max_size)
            d = compiled(state, p.images, p.image_sizes)
            b = resize_boxes(np.asarray(d.boxes), p.image_sizes, p.original_sizes)
            masks = paste(d.masks, b)
            jax.block_until_ready(masks)
            detections.append(int(np.asarray(d.valid).sum()))

        row["run"] = timed(run, repeats)
        row["xla"] = xla_figures(compiled)
        # XLA's cost analysis adds up every branch of the mask-slot switch; the FLOPs of the static
        # predict are what runs when every detection row is valid (and unknown otherwise).
        ours.cfg = dataclasses.replace(ours.cfg, mask_slot_buckets=())
        static = make_predict_fn(ours).jitted.lower(state, pre.images, pre.image_sizes).compile()
        full = detections[-1] == batch * ours.cfg.detections_per_img
        row["xla"]["flops"] = xla_figures(static)["flops"] + xla_figures(paste)["flops"] if full else None
    else:
        import torch

        detections = []

        def run():
            with torch.inference_mode():
                out = model(torch_images(images))
            detections.append(sum(len(o["boxes"]) for o in out))

        row["run"] = timed(run, repeats)
        row["torch_flops"] = _torch_flops(run)
    row["detections_per_image"] = detections[-1] / batch
    row["images_per_s"] = batch / row["run"]["median_s"]
    row["peak_rss_mib"] = peak_rss_mib()
    return row


# ----------------------------------------------------------------------------------------- train


def _our_train_config(height: int, width: int, batch: int, mask_mode: str):
    from maskx_jax.config import base_config

    c = base_config()
    c.model.depth = 50
    c.model.norm = "frozen_bn"
    c.model.freeze_at = 2  # torchvision's default trainable_backbone_layers=3 freezes the stem + layer1
    c.model.mask_mode = mask_mode
    c.data.min_size, c.data.max_size = min(height, width), max(height, width)
    c.data.pad_height, c.data.pad_width = -(-height // 32) * 32, -(-width // 32) * 32
    c.train.batch_size = batch
    c.train.optimizer = "sgd"
    c.train.lr = 0.02
    c.train.warmup_steps = 0
    # class_specific is torchvision's architecture (no MLP fusion); transfer is Mask^X as in the paper
    # (tau + MLP fusion), set A = every class so every positive gets a mask loss as in torchvision.
    c.model.mlp_fusion = mask_mode == "transfer"
    if mask_mode == "transfer":
        c.data.set_a = "all"
    return c


def _our_batch(images, targets, config):
    from maskx_jax.data.masks import crop_and_resample
    from maskx_jax.transform import normalize
    from maskx_jax.types import Batch

    b = len(images)
    h, w = images[0].shape[:2]
    ph, pw = config.data.pad_height, config.data.pad_width
    g, s = config.data.max_instances, config.data.mask_crop_size
    padded = np.zeros((b, ph, pw, 3), np.float32)
    boxes = np.zeros((b, g, 4), np.float32)
    classes = np.zeros((b, g), np.int32)
    valid = np.zeros((b, g), bool)
    crops = np.zeros((b, g, s, s), np.float32)
    for i, (im, t) in enumerate(zip(images, targets)):
        padded[i, :h, :w] = normalize(im.astype(np.float32) / 255.0)
        n = len(t["boxes"])
        boxes[i, :n], classes[i, :n], valid[i, :n] = t["boxes"], t["labels"], True
        for k in range(n):
            crops[i, k] = crop_and_resample(t["masks"][k], t["boxes"][k], s)
    return Batch(images=padded, image_sizes=np.tile([[h, w]], (b, 1)).astype(np.int32), gt_boxes=boxes,
                 gt_classes=classes, gt_valid=valid, gt_crowd=np.zeros((b, g), bool), gt_has_mask=valid.copy(),
                 gt_masks=crops, image_ids=np.arange(b, dtype=np.int32),
                 original_sizes=np.tile([[h, w]], (b, 1)).astype(np.int32))


def train(framework: str, height: int, width: int, batch: int = 2, instances: int = 8, repeats: int = 3,
          mask_mode: str = "class_specific", max_mask_rois: int = 128,
          mask_slot_buckets: tuple = (8, 16, 32, 64), exact_canvas: bool = True,
          mask_chunk_slots: int | None = None) -> dict:
    """``max_mask_rois``: maskx_jax's mask-loss RoI slots per image (torchvision's cap is 128 = 25% of 512);
    ``mask_chunk_slots``: maskx_jax's ``model.mask_chunk_slots`` (None = the default; 0 = no chunks: then
    ``mask_slot_buckets``, the smaller slot counts the step may pick, () = always all of them);
    ``exact_canvas``: maskx_jax's ``model.exact_canvas``."""
    images = smooth_images(batch, height, width, seed=3)
    targets = train_targets(batch, height, width, instances, seed=4)
    row = {"height": height, "width": width, "batch": batch, "instances": instances, "mask_mode": mask_mode,
           "max_mask_rois": max_mask_rois, "mask_slot_buckets": list(mask_slot_buckets)}
    if mask_chunk_slots is not None:
        row["mask_chunk_slots"] = mask_chunk_slots
    if framework == "jax":
        import jax

        from maskx_jax.train_lib import Trainer

        isolate_jax()
        config = _our_train_config(height, width, batch, mask_mode)
        config.model.max_mask_rois_per_image = max_mask_rois
        config.model.mask_slot_buckets = tuple(mask_slot_buckets)
        if mask_chunk_slots is not None:
            config.model.mask_chunk_slots = mask_chunk_slots
        row["mask_chunk_slots"] = int(config.model.mask_chunk_slots)
        config.model.exact_canvas = exact_canvas
        trainer = Trainer(config, COCO_CLASSES)
        state = trainer.init_state()
        trainer.release_init()  # as the training loop
        data = trainer.global_batch(_our_batch(images, targets, config))
        t0 = _time_now()
        step = trainer.train_step.compile(state, data)  # as the training loop: compile, then release
        row["compile_s"] = _time_now() - t0
        row["xla"] = xla_figures(step)
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], data, trainer.train_step.seed)  # the seed: an argument
            jax.block_until_ready(metrics["total"])

        row["run"] = timed(run, repeats)
    else:
        import torch
        import torchvision

        if mask_mode != "class_specific":
            raise ValueError("torchvision has only the class-specific mask head")
        torch.manual_seed(0)
        # The same model as maskx_jax's: FrozenBatchNorm and trainable layers 2-4 (torchvision's recipe
        # with a pretrained backbone). maskrcnn_resnet50_fpn(weights_backbone=None) would instead
        # train every layer with batch-statistics BatchNorm, a different (costlier) step.
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops.misc import FrozenBatchNorm2d

        body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        model = torchvision.models.detection.MaskRCNN(
            _resnet_fpn_extractor(body, trainable_layers=3), num_classes=COCO_CLASSES,
            min_size=min(height, width), max_size=max(height, width)).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
        timgs = torch_images(images)
        ttargets = [{k: torch.from_numpy(v) for k, v in t.items()} for t in targets]

        def run():
            losses = model(timgs, ttargets)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()

        row["run"] = timed(run, repeats)
        row["torch_flops"] = _torch_flops(run)
        row["mask_rois_per_image"] = _torch_mask_rois(model, run) / batch
    row["images_per_s"] = batch / row["run"]["median_s"]
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def _torch_flops(fn) -> float:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter`` (convolutions and matrix
    products only: element-wise work and torchvision's RoIAlign/NMS kernels are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _torch_mask_rois(model, fn) -> int:
    """RoIs torchvision's mask head saw in one call of ``fn`` (its positives: the work is data-dependent,
    whereas maskx_jax always runs the static ``max_mask_rois_per_image`` slots)."""
    seen = []
    hook = model.roi_heads.mask_head.register_forward_hook(lambda mod, inp, out: seen.append(int(inp[0].shape[0])))
    try:
        fn()
    finally:
        hook.remove()
    return sum(seen)


# --------------------------------------------------------------------------------------- kernels

# (name, x shape NHWC, kernel size, out channels, stride, what it is in Mask R-CNN R50-FPN at 512 x 512,
# batch 2).
KERNELS: tuple[tuple[str, tuple[int, int, int, int], int, int, int, str], ...] = (
    ("conv3x3", (64, 14, 14, 256), 3, 256, 1, "mask head, 32 RoIs/image"),
    ("conv3x3", (2, 128, 128, 256), 3, 256, 1, "FPN output / RPN conv at P2"),
    ("conv3x3", (2, 64, 64, 128), 3, 128, 1, "a layer2 block's conv2"),
    ("conv3x3", (2, 128, 128, 128), 3, 128, 2, "layer2.0.conv2 (stride 2)"),
    ("conv1x1", (2, 128, 128, 256), 1, 128, 1, "layer2.0.conv1 (layer1 output in)"),
    ("conv1x1", (2, 32, 32, 1024), 1, 256, 1, "a layer3 block's conv1"),
    ("matmul", (1024, 12544, 1, 1), 1, 1024, 1, "box head fc6, 512 RoIs/image"),
)


SMOKE_KERNELS = (("conv3x3", (2, 6, 6, 8), 3, 8, 1, "toy"), ("conv3x3", (2, 6, 6, 8), 3, 8, 2, "toy"),
                 ("conv1x1", (2, 6, 6, 8), 1, 4, 1, "toy"), ("matmul", (8, 16, 1, 1), 1, 4, 1, "toy"))


def kernels(framework: str, repeats: int = 5, smoke: bool = False) -> dict:
    """Single-op float32 throughput of the costliest kernels of a training step: forward, the input
    gradient and the filter gradient, GFLOP/s. maskx_jax goes through ``maskx_jax.conv.conv2d`` (the
    path its layers take, gradients included); torchvision's model calls ``torch.nn.functional``.
    What the training row can reach is bounded by these: equal FLOPs at lower kernel throughput."""
    rng = np.random.default_rng(0)
    row = {"kernels": []}
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        from maskx_jax.conv import conv2d

        isolate_jax()
    else:
        import torch
        import torch.nn.functional as F
    for name, shape, k, cout, stride, what in (SMOKE_KERNELS if smoke else KERNELS):
        x = rng.standard_normal(shape, dtype=np.float32)
        cin = shape[-1] if name != "matmul" else shape[1]
        w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
        if name == "matmul":
            x, w = x[:, :, 0, 0], w[0, 0]
            flops = 2 * x.shape[0] * cin * cout
        else:
            out_pixels = shape[0] * -(-shape[1] // stride) * -(-shape[2] // stride)  # padding k // 2
            flops = 2 * out_pixels * cin * cout * k * k
        if framework == "jax":
            fwd = ((lambda a, b: a @ b) if name == "matmul"
                   else (lambda a, b, p=k // 2, s=stride: conv2d(a, b, s, p)))
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            gj = jnp.asarray(rng.standard_normal(jax.eval_shape(fwd, xj, wj).shape, dtype=np.float32))
            fns = {"forward": jax.jit(fwd),
                   "input_grad": jax.jit(lambda a, b, g: jax.vjp(lambda a_: fwd(a_, b), a)[1](g)[0]),
                   "filter_grad": jax.jit(lambda a, b, g: jax.vjp(lambda b_: fwd(a, b_), b)[1](g)[0])}
            calls = {"forward": lambda f: f(xj, wj), "input_grad": lambda f: f(xj, wj, gj),
                     "filter_grad": lambda f: f(xj, wj, gj)}
            times = {m: timed(lambda f=f, m=m: jax.block_until_ready(calls[m](f)), repeats, warmup=2)
                     for m, f in fns.items()}
        else:
            if name == "matmul":
                xt, wt = torch.from_numpy(x), torch.from_numpy(w)
                fwd = lambda a, b: a @ b
            else:
                xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
                wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
                fwd = lambda a, b, p=k // 2, s=stride: F.conv2d(a, b, stride=s, padding=p)
            with torch.no_grad():
                gt = torch.randn_like(fwd(xt, wt))

            def grad_of(wrt_input: bool):
                a, b = xt.clone().requires_grad_(wrt_input), wt.clone().requires_grad_(not wrt_input)
                return lambda: torch.autograd.grad(fwd(a, b), a if wrt_input else b, gt)

            def forward():
                with torch.no_grad():
                    fwd(xt, wt)

            # The gradient timings include the forward that autograd needs: subtract the forward median.
            times = {"forward": timed(forward, repeats, warmup=2),
                     "input_grad": timed(grad_of(True), repeats, warmup=2),
                     "filter_grad": timed(grad_of(False), repeats, warmup=2)}
            for m in ("input_grad", "filter_grad"):
                times[m]["forward_included_s"] = times[m]["median_s"]
                times[m]["median_s"] = max(times[m]["median_s"] - times["forward"]["median_s"], 1e-9)
        row["kernels"].append({"name": name, "shape": list(shape), "k": k, "out": cout, "stride": stride,
                               "what": what, "gflop": flops / 1e9, **times})
    row["peak_rss_mib"] = peak_rss_mib()
    return row


CASES = {"matmul_peak": matmul_peak, "roi_align": roi_align, "inference": inference, "train": train,
         "kernels": kernels}
