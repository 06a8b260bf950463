"""train_lib: exact resumption, non-finite handling, config checks, init checkpoints, logging.

The loop machinery runs with a tiny stand-in detector (seconds); the resume test also runs the
real Mask^X R-CNN at toy size once ``maskx_jax.model_builder`` and the data pipeline exist.
"""
from __future__ import annotations

import glob
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

import train_fixtures as F
from maskx_jax import host_memory, train_lib
from maskx_jax.checkpoint import save_flat
from maskx_jax.train import trainer as trainer_lib


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_bitwise(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def trainer():
    """One compiled stand-in trainer shared by the tests (the schedule does not depend on train.steps)."""
    return train_lib.Trainer(F.stand_in_config(), F.NUM_CLASSES, model_fn=F.tiny_model_fn)


def _train(cfg, workdir, trainer, nan_steps=(), **kw):
    return train_lib.train(cfg, str(workdir), trainer=trainer, train_iter_fn=F.make_synthetic_iter(nan_steps),
                           evaluate_at_end=False, progress=False, **kw)


def _restore(workdir, trainer, step):
    mngr = train_lib.make_checkpoint_manager(str(workdir), F.stand_in_config())
    try:
        assert step in mngr.all_steps(), mngr.all_steps()
        return train_lib.restore_state(mngr, trainer, step)
    finally:
        mngr.close()


def test_resume_equals_uninterrupted(tmp_path, trainer):
    straight = _train(F.stand_in_config(steps=6), tmp_path / "straight", trainer)
    # 4 steps, then the same workdir to 6 steps
    _train(F.stand_in_config(steps=4), tmp_path / "split", trainer)
    resumed = _train(F.stand_in_config(steps=6), tmp_path / "split", trainer)
    assert straight.step == resumed.step == 6
    _assert_bitwise(straight.state, resumed.state)
    _assert_bitwise(_restore(tmp_path / "straight", trainer, 6), _restore(tmp_path / "split", trainer, 6))

    # killed in the middle of step 5 (after the step-4 checkpoint), then the same command again
    class Killed(Exception):
        pass

    def dying_iter(config, *, start_step, **kw):
        for step, b in enumerate(F.make_synthetic_iter()(config, start_step=start_step, **kw), start_step):
            if step == 5:
                raise Killed
            yield b

    cfg = F.stand_in_config(steps=6)
    with pytest.raises(Killed):
        train_lib.train(cfg, str(tmp_path / "killed"), trainer=trainer, train_iter_fn=dying_iter,
                        evaluate_at_end=False, progress=False)
    again = _train(cfg, tmp_path / "killed", trainer)
    _assert_bitwise(straight.state, again.state)

    # SIGTERM while step 2 is prepared: checkpoint after that step (3, off the checkpoint_every grid), stop, resume
    def terminated_iter(config, *, start_step, **kw):
        for step, b in enumerate(F.make_synthetic_iter()(config, start_step=start_step, **kw), start_step):
            if step == 2 and start_step == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    before = signal.getsignal(signal.SIGTERM)
    first = train_lib.train(cfg, str(tmp_path / "term"), trainer=trainer, train_iter_fn=terminated_iter,
                            evaluate_at_end=False, progress=False)
    assert first.preempted and first.step == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    # The signal arrived while step 2 was prepared: that step ran and its result (3 completed steps) was
    # saved, the latest checkpoint, bitwise the uninterrupted run's state after 3 steps.
    mngr = train_lib.make_checkpoint_manager(str(tmp_path / "term"), cfg)
    assert mngr.latest_step() == 3
    mngr.close()
    three = _train(F.stand_in_config(steps=3), tmp_path / "three", trainer)
    _assert_bitwise(three.state, _restore(tmp_path / "term", trainer, 3))
    again = train_lib.train(cfg, str(tmp_path / "term"), trainer=trainer, train_iter_fn=terminated_iter,
                            evaluate_at_end=False, progress=False)
    assert not again.preempted
    _assert_bitwise(straight.state, again.state)


def test_nonfinite_stop_names_step_and_keeps_checkpoint(tmp_path, trainer):
    _train(F.stand_in_config(steps=2), tmp_path / "clean", trainer)
    cfg = F.stand_in_config(steps=6, on_nonfinite="stop")
    with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite loss at step 3\b") as err:
        _train(cfg, tmp_path / "run", trainer, nan_steps=(3,))
    assert err.value.step == 3
    assert "latest checkpoint is step 2" in str(err.value)
    mngr = train_lib.make_checkpoint_manager(str(tmp_path / "run"), cfg)
    assert mngr.all_steps() == [2]
    mngr.close()
    _assert_bitwise(_restore(tmp_path / "clean", trainer, 2), _restore(tmp_path / "run", trainer, 2))

    # the same command with on_nonfinite=skip resumes from step 2 and skips step 3
    skip_cfg = F.stand_in_config(steps=6, on_nonfinite="skip")
    skip_trainer = train_lib.Trainer(skip_cfg, F.NUM_CLASSES, model_fn=F.tiny_model_fn, mesh=trainer.mesh)
    res = _train(skip_cfg, tmp_path / "run", skip_trainer, nan_steps=(3,))
    assert res.step == 6 and res.skipped == 1


def test_nonfinite_gradient_with_a_finite_loss_is_caught(tmp_path, trainer):
    """Only the gradient norm can tell: the loss of the poisoned step is finite."""
    state = trainer.init_state()
    before = jax.device_get(state)
    state, m = trainer.train_step(state, trainer.global_batch(F.synthetic_batch(0, 0, 8, bad_gradient=True)))
    assert np.isfinite(float(m["total"])) and not np.isfinite(float(m["grad_norm"])) and bool(m["nonfinite"])
    _assert_bitwise(before.params, state.params)
    _assert_bitwise(before.opt_state, state.opt_state)
    cfg = F.stand_in_config(steps=6, on_nonfinite="stop")
    with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite gradient at step 3\b"):
        train_lib.train(cfg, str(tmp_path), trainer=trainer, evaluate_at_end=False, progress=False,
                        train_iter_fn=F.make_synthetic_iter(bad_gradient_steps=(3,)))


def test_nonfinite_step_leaves_params_unchanged(trainer):
    for mode in train_lib.ON_NONFINITE:
        cfg = F.stand_in_config(on_nonfinite=mode)
        tr = train_lib.Trainer(cfg, F.NUM_CLASSES, model_fn=F.tiny_model_fn, mesh=trainer.mesh)
        state = tr.init_state()
        state, _ = tr.train_step(state, tr.global_batch(F.synthetic_batch(0, 0, 8)))  # non-zero momentum
        before = jax.device_get(state)
        state, m = tr.train_step(state, tr.global_batch(F.synthetic_batch(0, 1, 8, nan=True)))
        assert bool(m["nonfinite"]) and not np.isfinite(float(m["total"]))
        _assert_bitwise(before.params, state.params)
        _assert_bitwise(before.opt_state, state.opt_state)
        assert int(state.step) == 2
        if mode == "skip":
            assert int(state.skipped) == 1 and int(state.halted_at) == -1
            state, m = tr.train_step(state, tr.global_batch(F.synthetic_batch(0, 2, 8)))
            assert not bool(m["nonfinite"]) and int(m["skipped"]) == 1
            assert not np.array_equal(np.asarray(jax.tree.leaves(state.params)[0]), jax.tree.leaves(before.params)[0])
        else:
            assert int(state.halted_at) == 1
            # once halted, later (finite) steps change nothing either
            state, m = tr.train_step(state, tr.global_batch(F.synthetic_batch(0, 2, 8)))
            _assert_bitwise(before.params, state.params)


def test_config_mismatch_refused_with_diff(tmp_path, trainer):
    _train(F.stand_in_config(steps=2), tmp_path, trainer)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["train"]["steps"] == 2 and saved["model"]["depth"] == 50
    cfg = F.stand_in_config(steps=4)
    cfg.model.depth = 18
    cfg.model.aligned = True
    with pytest.raises(train_lib.ConfigMismatchError) as err:
        train_lib.train(cfg, str(tmp_path), model_fn=F.tiny_model_fn, num_classes=F.NUM_CLASSES,
                        train_iter_fn=F.make_synthetic_iter(), evaluate_at_end=False, progress=False)
    msg = str(err.value)
    assert "model.depth: 50 (saved) -> 18 (now)" in msg
    assert "model.aligned: False (saved) -> True (now)" in msg
    assert "train.steps" not in msg  # only architecture keys are refused
    # non-architecture changes (schedule, inference thresholds) resume fine
    cfg = F.stand_in_config(steps=4, lr=0.05)
    cfg.model.box_score_thresh = 0.3
    with pytest.raises(ValueError, match="compiled for a different config"):
        _train(cfg, tmp_path, trainer)  # a reused Trainer must match the compile-time keys
    res = train_lib.train(cfg, str(tmp_path), model_fn=F.tiny_model_fn, num_classes=F.NUM_CLASSES,
                          train_iter_fn=F.make_synthetic_iter(), evaluate_at_end=False, progress=False)
    assert res.step == 4


def test_init_checkpoint_report(tmp_path, trainer):
    state = trainer.init_state()
    init = jax.device_get(state)
    conv_kernel = np.full(init.params["conv"]["kernel"].shape, 0.25, np.float32)
    flat = {
        ("conv", "kernel"): conv_kernel,
        ("scale",): np.full((8,), 2.0, np.float32),  # a frozen (non-Param) variable
        ("cls", "kernel"): np.zeros((8, 99), np.float32),  # wrong class count
        ("roi_heads", "extra"): np.zeros((3,), np.float32),
    }
    save_flat(str(tmp_path / "ckpt"), flat, {"kind": "detector", "config": {}, "source": "test"})
    new, report = trainer.load_init_checkpoint(state, str(tmp_path / "ckpt"))
    assert sorted(report["loaded"]) == ["conv.kernel", "scale"]
    assert report["unused"] == ["roi_heads.extra"]
    assert report["shape_mismatch"] == ["cls.kernel: checkpoint (8, 99), model (8, 5)"]
    assert sorted(report["not_loaded"]) == ["box.bias", "box.kernel", "cls.bias", "cls.kernel", "conv.bias"]
    np.testing.assert_array_equal(np.asarray(new.params["conv"]["kernel"][...]), conv_kernel)
    np.testing.assert_array_equal(np.asarray(new.rest["scale"][...]), 2.0)
    np.testing.assert_array_equal(np.asarray(new.params["cls"]["kernel"][...]), init.params["cls"]["kernel"][...])

    # through train(): applied on a fresh start, report written next to the run
    cfg = F.stand_in_config(steps=1, init_checkpoint=str(tmp_path / "ckpt"))
    _train(cfg, tmp_path / "run", trainer)
    assert json.load(open(tmp_path / "run" / train_lib.INIT_REPORT_FILE))["loaded"] == report["loaded"]


def _read_events(path):
    """Scalars {tag: [(step, value)]} from a TensorBoard event file (TFRecord framing)."""
    out: dict = {}
    for ev in F.iter_events(path):
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_scalars(tmp_path, trainer):
    _train(F.stand_in_config(steps=4, log_every=2), tmp_path, trainer)
    (events,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    scalars = _read_events(events)
    for tag in ("loss/total", "loss/loss_classifier", "loss/loss_box_reg", "lr", "grad_norm", "images_per_sec"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["loss/total"]] == [2, 4]
    np.testing.assert_allclose(scalars["lr"][-1][1], 0.1, rtol=1e-6)  # step 3: past the warmup, before lr_steps
    assert all(np.isfinite(v) and v > 0 for _, v in scalars["images_per_sec"])



def test_real_model_resume_bitwise(tmp_path):
    """The real detector and data pipeline: 2 steps (a checkpoint at 2), then the same workdir to 4 steps,
    equals 4 uninterrupted steps bitwise; the end-of-run evaluation writes metrics.json."""
    cfg4 = F.tiny_config(str(tmp_path / "data"), steps=4)
    info = train_lib.load_datasets(cfg4)
    trainer = train_lib.Trainer(cfg4, info.num_classes)
    run = lambda steps, wd, **kw: train_lib.train(
        F.tiny_config(str(tmp_path / "data"), steps=steps), str(tmp_path / wd), trainer=trainer, info=info,
        progress=False, **kw)
    straight = run(4, "straight", evaluate_at_end=False)
    run(2, "split", evaluate_at_end=False)
    resumed = run(4, "split", evaluate_at_end=True)
    assert straight.step == resumed.step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(straight.state.params)))
    _assert_bitwise(straight.state, resumed.state)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["2", "4"]
    metrics = json.load(open(tmp_path / "split" / train_lib.METRICS_FILE))
    assert set(metrics) == {"all", "set_a", "set_b"}
    assert resumed.metrics == metrics


def test_real_model_init_checkpoint(tmp_path):
    """Converted-checkpoint layouts on the real detector: a detector with another class count loads
    all but the class-sized layers; a ResNet checkpoint lands under backbone.body."""
    from maskx_jax.checkpoint import save_detector, save_resnet
    from maskx_jax.model_builder import build_model

    cfg = F.real_model_config()
    trainer = train_lib.Trainer(cfg, F.NUM_CLASSES)
    state = trainer.init_state()
    other = build_model(cfg, F.NUM_CLASSES + 2, seed=7)
    save_detector(str(tmp_path / "det"), other)
    new, report = trainer.load_init_checkpoint(state, str(tmp_path / "det"))
    assert report["kind"] == "detector" and not report["unused"]
    mismatched = {m.split(":")[0] for m in report["shape_mismatch"]}
    assert mismatched and all(n.startswith("roi_heads.") for n in mismatched), mismatched
    assert set(report["not_loaded"]) == mismatched
    assert "backbone.body.conv1.kernel" in report["loaded"] and "backbone.body.bn1.running_var" in report["loaded"]
    np.testing.assert_array_equal(np.asarray(new.rest["backbone"]["body"]["conv1"]["kernel"][...]),
                                  np.asarray(other.backbone.body.conv1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(new.params["rpn"]["head"]["conv"]["kernel"][...]),
                                  np.asarray(other.rpn.head.conv.kernel[...]))

    save_resnet(str(tmp_path / "resnet"), other.backbone.body)
    new, report = trainer.load_init_checkpoint(state, str(tmp_path / "resnet"))
    assert report["loaded"] and all(n.startswith("backbone.body.") for n in report["loaded"])
    assert not report["unused"] and not report["shape_mismatch"]
    assert not any(n.startswith("backbone.body.") for n in report["not_loaded"])
    np.testing.assert_array_equal(np.asarray(new.params["backbone"]["body"]["layer4"][1]["conv2"]["kernel"][...]),
                                  np.asarray(other.backbone.body.layer4[1].conv2.kernel[...]))


def test_train_step_compiles_once(tmp_path, monkeypatch):
    """Many steps with new data and a new state each time: one trace and one executable. The loop compiles the
    step ahead of its first call (to release the compiler's host memory before the step runs) and drops the init
    program once the state exists: the calls then trace, lower and compile nothing, and neither function leaves
    a program in JAX's caches (the step keeps its own)."""
    events = []
    listen = lambda name, *_, **__: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(listen)
    released = []
    monkeypatch.setattr(trainer_lib, "release_host_memory", lambda: released.append(1) or (2.0, 1.0))
    trainer = train_lib.Trainer(F.stand_in_config(), F.NUM_CLASSES, model_fn=F.tiny_model_fn)
    state = trainer.init_state()
    assert trainer._init._cache_size() == 1
    trainer.release_init()
    assert trainer._init._cache_size() == 0 and released == [1]
    first = trainer.global_batch(F.synthetic_batch(0, 0, F.stand_in_config().train.batch_size))
    compiled = trainer.train_step.compile(state, first)
    assert compiled.memory_analysis() is not None and released == [1, 1]
    events.clear()
    for step in range(4):
        batch = trainer.global_batch(F.synthetic_batch(0, step, F.stand_in_config().train.batch_size))
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics["total"])
    assert int(state.step) == 4
    assert trainer.train_step.jitted._cache_size() == 0  # the calls ran the kept program, not jax.jit's
    assert trainer.train_step.compile(state, batch) is compiled  # same signature: no second compile
    jax.monitoring.unregister_event_duration_listener(listen)
    assert not [e for e in events if e.startswith("/jax/core/compile/")], events


def test_release_host_memory_reports_resident_sizes():
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, freed below: glibc may keep it, the trim returns it
    del block
    out = host_memory.release_host_memory()
    assert out is not None  # this machine runs glibc on Linux
    before, after = out
    assert 0 < after <= before + 1


def test_the_seed_is_an_argument_of_the_compiled_programs():
    """Runs that differ only in train.seed lower to the same programs (one compile serves a seed sweep, through
    the persistent cache), yet start from different parameters and draw different step keys."""
    def trainer(seed):
        cfg = F.stand_in_config()
        cfg.train.seed = seed
        return train_lib.Trainer(cfg, F.NUM_CLASSES, model_fn=F.tiny_model_fn)

    a, b = trainer(0), trainer(7)
    batch = a.global_batch(F.synthetic_batch(0, 0, F.stand_in_config().train.batch_size))
    assert a._init.lower(a._seed).as_text() == b._init.lower(b._seed).as_text()
    assert a.train_step.lower(a.abstract_state(), batch).as_text() == \
        b.train_step.lower(b.abstract_state(), batch).as_text()
    pa, pb = jax.device_get(a.init_state().params), jax.device_get(b.init_state().params)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    # the init is the model built eagerly from the same seed, bitwise
    _, eager, _ = nnx.split(F.tiny_model_fn(None, F.NUM_CLASSES, 7), nnx.Param, ...)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pb), jax.tree.leaves(jax.device_get(eager))))
