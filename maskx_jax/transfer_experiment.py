"""Does Mask^X transfer? The paper's controlled comparison, on one frozen detector per seed.

    python -m maskx_jax.transfer_experiment --config configs/transfer_synthetic.py --workdir runs/transfer \\
        --output benchmarks/results/transfer.json --chart docs/transfer.png

Protocol (Hu et al. 2018, Sec. 4.1's ablations; the arms and schedules come from the config module):

1. For each seed, train one box detector (``model.mask_mode=none``: the boxes of every class, set A and set B)
   for ``DETECTOR_STEPS``.
2. On that detector, frozen (``train.init_checkpoint`` = its work directory, ``train.freeze=detector``), train
   one mask branch per arm of :data:`ARMS` for ``MASK_STEPS``, with the same seed: the same data order and the
   same RoI sampling. The detector is the same for every arm, so the mask head is the only difference.
3. Evaluate every arm on the validation split with the config's set A / set B: set-B and set-A mask AP,
   set-B box AP (the same for every arm of a seed: a check that the detector really was frozen).
4. Optionally the end-to-end runs (:data:`END_TO_END`: the whole model from scratch for ``DETECTOR_STEPS``),
   over the same seeds, for comparison.

Every run lives in ``WORKDIR/seed<s>/<run>`` and resumes if interrupted; a finished run leaves
``result.json`` there and is not run again. The results file (``--output``) is rewritten after every run
with the seeds finished so far; :mod:`maskx_jax.transfer_report` turns it into the README's tables and chart.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from maskx_jax.backends.cpu import xla_flags

# Mask-branch arms: config overrides on top of the experiment's base config.
ARMS: dict[str, dict[str, Any]] = {
    "class_agnostic": {"model.mask_mode": "class_agnostic", "model.mlp_fusion": False},
    "transfer": {"model.mask_mode": "transfer", "model.transfer_input": "cls+box", "model.mlp_fusion": False},
    "transfer_mlp": {"model.mask_mode": "transfer", "model.transfer_input": "cls+box", "model.mlp_fusion": True},
    # The paper's Table 1a control: tau reads fixed random vectors, not the detection weights.
    "random_embedding": {"model.mask_mode": "transfer", "model.transfer_input": "random", "model.mlp_fusion": False},
    # The ceiling: an ordinary class-specific Mask R-CNN head trained with the masks of ALL classes.
    "oracle": {"model.mask_mode": "class_specific", "model.mlp_fusion": False, "data.set_a": "all"},
}
END_TO_END = ("class_agnostic", "transfer_mlp")
RESULT_FILE = "result.json"
DETECTOR = "detector"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What one experiment runs: the base config (a ``configs/*.py`` module), seeds, arms and schedules."""

    config_path: str
    seeds: tuple[int, ...]
    detector_steps: int
    mask_steps: int
    arms: tuple[str, ...] = tuple(ARMS)
    end_to_end: tuple[str, ...] = END_TO_END
    overrides: tuple[tuple[str, Any], ...] = ()  # (dotted key, value) applied to the base config


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("_maskx_transfer_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set(config, key: str, value: Any) -> None:
    section, leaf = key.split(".")
    config[section][leaf] = value


def base_config(protocol: Protocol):
    config = load_module(protocol.config_path).get_config()
    for key, value in protocol.overrides:
        _set(config, key, value)
    return config


def _schedule(config, steps: int, seed: int):
    """``steps`` optimisation steps, the step decays at 75 % and 92 % of them, a warmup of at most a tenth."""
    c = copy.deepcopy(config)
    t = c.train
    t.seed = seed
    t.steps = steps
    t.lr_steps = tuple(s for s in (int(0.75 * steps), int(0.92 * steps)) if 0 < s < steps)
    t.warmup_steps = min(int(t.warmup_steps), max(steps // 10, 1))
    t.checkpoint_every = min(int(t.checkpoint_every), steps)
    return c


def detector_config(base, seed: int, steps: int):
    """Stage 1: a box-only detector (no mask branch at all) on the base config's data."""
    c = _schedule(base, steps, seed)
    c.model.mask_mode = "none"
    c.model.mlp_fusion = False
    return c


def arm_config(base, arm: str, seed: int, steps: int, detector_dir: str):
    """Stage 2: arm ``arm``'s mask branch on the frozen detector in ``detector_dir``."""
    c = _schedule(base, steps, seed)
    for key, value in ARMS[arm].items():
        _set(c, key, value)
    c.train.init_checkpoint = detector_dir
    c.train.freeze = "detector"
    return c


def end_to_end_config(base, arm: str, seed: int, steps: int):
    """The whole model from scratch with arm ``arm``'s mask branch (the usual end-to-end training)."""
    c = _schedule(base, steps, seed)
    for key, value in ARMS[arm].items():
        _set(c, key, value)
    return c


def _ap(metrics: Mapping | None, group: str, iou_type: str, name: str = "AP") -> float | None:
    v = (((metrics or {}).get(group) or {}).get(iou_type) or {}).get(name)
    return None if v is None or v < 0 else round(100.0 * float(v), 3)


def _write_json(path: str, data: Any) -> None:
    """Written beside and renamed into place: an interrupted write never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def run_once(config, workdir: str, split_set_a: str, *, progress: bool = True) -> dict:
    """Train ``config`` in ``workdir`` (resuming), evaluate with set A = ``split_set_a``; return its result.

    The evaluation uses the experiment's split whatever set A the run trained with (the oracle trains on
    every class's masks but is scored on the same set B as the others). A finished run's ``result.json``
    is returned without training again, provided the run was made with this very config (else ValueError).
    """
    from maskx_jax import train_lib
    from maskx_jax.config import validate

    path = os.path.join(workdir, RESULT_FILE)
    if os.path.isfile(path):
        with open(os.path.join(workdir, train_lib.CONFIG_FILE)) as f:
            saved = json.load(f)
        changed = [d for d in train_lib.config_differences(saved, train_lib.config_to_json_dict(config))
                   if not (d[1] == "<absent>" and d[2] == _default(d[0]))]  # a key added since, at its default
        if changed:
            raise ValueError(f"{workdir} holds a finished run with other settings; use another --workdir (or "
                             f"delete it to run again):\n{train_lib.format_differences(changed)}")
        with open(path) as f:
            return json.load(f)
    validate(config)
    commit = _commit()  # the code this run trains with
    start = time.time()
    result = train_lib.train(config, workdir, evaluate_at_end=False, progress=progress)
    if result.preempted:
        raise KeyboardInterrupt(f"{workdir}: stopped by a termination request; re-run to continue")
    eval_config = copy.deepcopy(config)
    eval_config.data.set_a = split_set_a
    eval_info = train_lib.load_datasets(eval_config)
    metrics = train_lib.evaluate(eval_config, workdir, trainer=result.trainer, state=result.state,
                                 step=result.step, progress=progress, info=eval_info)
    record = {
        "set_b_mask_ap": _ap(metrics, "set_b", "segm"), "set_a_mask_ap": _ap(metrics, "set_a", "segm"),
        "set_b_mask_ap50": _ap(metrics, "set_b", "segm", "AP50"),
        "set_b_box_ap": _ap(metrics, "set_b", "bbox"), "set_a_box_ap": _ap(metrics, "set_a", "bbox"),
        "seconds_per_step": result.seconds_per_step, "steps": result.step, "wall_seconds": time.time() - start,
        "commit": commit,
    }
    _write_json(path, record)
    return record


def _default(key: str) -> Any:
    """``base_config()``'s value of a dotted key, as JSON (``'<none>'`` for a key it does not have)."""
    from maskx_jax import config as config_lib
    from maskx_jax import train_lib

    return train_lib.flat_config(train_lib.config_to_json_dict(config_lib.base_config())).get(key, "<none>")


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(protocol: Protocol, done: Mapping[int, Mapping[str, dict]], base) -> dict:
    """The results file's content from ``done`` = {seed: {run name: result}}: only seeds whose every run finished,
    values per seed in seed order (AP in %)."""
    runs = [DETECTOR] + list(protocol.arms) + [f"e2e_{a}" for a in protocol.end_to_end]
    seeds = [s for s in protocol.seeds if all(r in done.get(s, {}) for r in runs)]
    d = base.data
    series = lambda run, key: [done[s][run].get(key) for s in seeds]
    keys = ("set_b_mask_ap", "set_a_mask_ap", "set_b_mask_ap50", "set_b_box_ap", "set_a_box_ap", "seconds_per_step")
    return {
        "dataset": (f"built-in synthetic {d.synthetic_variant} ({d.synthetic_num_train} train / {d.synthetic_num_val} "
                    f"val images, {d.synthetic_image_size}x{d.synthetic_image_size}), set A = {d.set_a}"),
        "config": os.path.relpath(protocol.config_path),
        "commit": _commit(),  # of the code that collected the results
        # of the code each run trained with ("not recorded": runs made before this field existed)
        "run_commits": sorted({str(r.get("commit", "not recorded")) for s in seeds for r in done[s].values()}),
        "seeds": seeds,
        "complete": len(seeds) == len(protocol.seeds),
        "protocol": {"detector_steps": protocol.detector_steps, "mask_steps": protocol.mask_steps,
                     "batch_size": int(base.train.batch_size), "optimizer": str(base.train.optimizer),
                     "lr": float(base.train.lr), "overrides": [list(o) for o in protocol.overrides]},
        "detector": {k: series(DETECTOR, k) for k in ("set_b_box_ap", "set_a_box_ap", "seconds_per_step")},
        "arms": {a: {k: series(a, k) for k in keys} for a in protocol.arms},
        "end_to_end": {a: {k: series(f"e2e_{a}", k) for k in keys} for a in protocol.end_to_end},
    }


def run_experiment(protocol: Protocol, workdir: str, output: str | None = None, *, progress: bool = True,
                   on_update: Callable[[dict], None] | None = None) -> dict:
    """Every run of ``protocol`` under ``workdir``; the results (see :func:`collect`) after each run go to
    ``output`` (JSON) and ``on_update``. Returns the final results."""
    unknown = [a for a in protocol.arms + protocol.end_to_end if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; expected some of {list(ARMS)}")
    base = base_config(protocol)
    split = str(base.data.set_a)
    done: dict[int, dict[str, dict]] = {}

    def record(seed: int, run: str, result: dict) -> None:
        done.setdefault(seed, {})[run] = result
        results = collect(protocol, done, base)
        if output:
            _write_json(output, results)
        if on_update is not None:
            on_update(results)

    def announce(seed: int, run: str, config, directory: str) -> None:
        frozen = f", frozen: {config.train.freeze}" if config.train.freeze else ""
        print(f"\n=== seed {seed}: {run} ({config.train.steps} steps, mask_mode={config.model.mask_mode}{frozen}) "
              f"-> {directory}", flush=True)

    for seed in protocol.seeds:
        seed_dir = os.path.join(os.path.abspath(workdir), f"seed{seed}")
        det_dir = os.path.join(seed_dir, DETECTOR)
        config = detector_config(base, seed, protocol.detector_steps)
        announce(seed, DETECTOR, config, det_dir)
        record(seed, DETECTOR, run_once(config, det_dir, split, progress=progress))
        for arm in protocol.arms:
            config = arm_config(base, arm, seed, protocol.mask_steps, det_dir)
            directory = os.path.join(seed_dir, arm)
            announce(seed, arm, config, directory)
            record(seed, arm, run_once(config, directory, split, progress=progress))
        for arm in protocol.end_to_end:
            config = end_to_end_config(base, arm, seed, protocol.detector_steps)
            directory = os.path.join(seed_dir, f"e2e_{arm}")
            announce(seed, f"end-to-end {arm}", config, directory)
            record(seed, f"e2e_{arm}", run_once(config, directory, split, progress=progress))
    return collect(protocol, done, base)


def parse_override(text: str) -> tuple[str, Any]:
    """``SECTION.KEY=VALUE`` -> (key, value): a Python literal, else the bare string."""
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1:
        raise argparse.ArgumentTypeError(f"--set expects SECTION.KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskx_jax.transfer_experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/transfer_synthetic.py", help="base config module (with "
                   "get_config(), DETECTOR_STEPS, MASK_STEPS, SEEDS)")
    p.add_argument("--workdir", default="runs/transfer")
    p.add_argument("--output", default="",
                   help="results JSON (rewritten after every run); default WORKDIR/transfer.json")
    p.add_argument("--table", default="", help="markdown tables (default: the output path with .md)")
    p.add_argument("--chart", default="", help="bar chart PNG of set-B mask AP (optional)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: the config's SEEDS)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"mask-branch arms on the frozen detector ({', '.join(ARMS)})")
    p.add_argument("--end-to-end", default=",".join(END_TO_END), help="end-to-end arms ('' for none)")
    p.add_argument("--detector-steps", type=int, default=0, help="override the config's DETECTOR_STEPS")
    p.add_argument("--mask-steps", type=int, default=0, help="override the config's MASK_STEPS")
    p.add_argument("--set", action="append", type=parse_override, default=[], metavar="SECTION.KEY=VALUE",
                   help="override a base config key (repeatable), e.g. data.synthetic_num_train=8")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    print(xla_flags.apply_for_entry_point())  # before anything starts a JAX backend

    from absl import logging as absl_logging

    from maskx_jax import train_lib, transfer_report

    absl_logging.set_verbosity(absl_logging.WARNING)
    train_lib.quiet_library_logs()
    module = load_module(args.config)
    protocol = Protocol(
        config_path=args.config,
        seeds=tuple(int(s) for s in _names(args.seeds)) if args.seeds else tuple(module.SEEDS),
        detector_steps=args.detector_steps or int(module.DETECTOR_STEPS),
        mask_steps=args.mask_steps or int(module.MASK_STEPS),
        arms=_names(args.arms), end_to_end=_names(args.end_to_end), overrides=tuple(args.set))
    output = args.output or os.path.join(args.workdir, "transfer.json")
    table = args.table or os.path.splitext(output)[0] + ".md"

    def write_reports(results: dict) -> None:
        if not results["seeds"]:
            return
        with open(table + ".tmp", "w") as f:
            f.write(transfer_report.markdown(results))
        os.replace(table + ".tmp", table)
        if args.chart:
            transfer_report.bar_chart(results, args.chart)

    results = run_experiment(protocol, args.workdir, output, progress=not args.no_progress, on_update=write_reports)
    print(f"\nresults: {output}\ntables: {table}" + (f"\nchart: {args.chart}" if args.chart else ""))
    if results["seeds"]:
        print("\n" + transfer_report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
