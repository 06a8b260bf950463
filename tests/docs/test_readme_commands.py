"""Every command shown in README.md runs: here, or (listed in COVERED_ELSEWHERE, with the reason) elsewhere.

The README's shell commands and Python snippets are read from its fenced blocks (see
``readme_blocks.py``) and run in README order in one directory that stands in for the reader's
checkout (``readme_session.py``: the repository's files, a few photos, a COCO-layout folder made of
``../shared/data/minicoco``), so each command finds what the ones before it wrote (``ckpt/maskrcnn``
from the conversion, ``runs/maskx_demo`` from training, ...). Each command runs as written, with
``python`` the test's interpreter and these additions, all in the tables below:

- ``python train.py``: tiny-run overrides appended (:func:`train_overrides`; the last value of a
  repeated ``--config.KEY`` wins): 1 step (2 when the command sets ``train.steps`` itself, so it resumes
  from the previous command's checkpoint), batch 2, evaluation on 2 images. Paper-sized models (depth
  >= 50) also get small RoI/proposal counts and, unless a detector checkpoint initialises them, narrow
  FPN/heads; images larger than 128x128 are shrunk to 128. Depth, config, data and init checkpoint stay as
  written.
- ``python -m maskx_jax.predict``: small input sizes appended.
- ``python -m convert.from_torch``: a torchvision state dict with random weights is written first at
  ``--checkpoint`` when the reader would have brought their own file.
- ``PATH_ALIASES`` / ``ARG_SUBSTITUTIONS`` / ``SNIPPETS``: paths the README assumes from ``make demo``,
  and the Python snippet's sizes and input image.

A command that no rule runs and that is not in COVERED_ELSEWHERE fails
``test_every_readme_command_is_run_or_accounted_for``: a new README command cannot go untested.
README blocks tagged ``text`` are examples that cannot run as written (e.g. with the reader's own files).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable

import pytest

from readme_blocks import Command, Snippet, readme_items
import resources
from readme_session import ROOT, make_session, make_torch_checkpoint
from train_subprocess import env as subprocess_env

README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 600

# README commands this test does not run, each with where it is run instead and why.
COVERED_ELSEWHERE: dict[str, str] = {
    "make demo": "the demo itself: ~15 min of both cores (python -m maskx_jax.demo: one detector and three mask "
                 "branches on configs/transfer_synthetic.py); tests/integration/test_transfer_experiment.py runs "
                 "the same driver for real at toy size (two seeds, every arm) and the demo's table on its first seed.",
    "python -m maskx_jax.transfer_experiment --config configs/transfer_shapes10.py --workdir runs/transfer_shapes10 "
    "--output benchmarks/results/transfer.json --chart docs/transfer.png":
        "the multi-seed experiment: ~2.5 h of both cores; tests/integration/test_transfer_experiment.py runs the "
        "same command (main()) at toy size: two seeds, every arm, tables and chart.",
    "python -m maskx_jax.transfer_experiment --config configs/transfer_synthetic.py --workdir runs/transfer_shapes24 "
    "--output benchmarks/results/transfer_shapes24.json --chart docs/transfer_shapes24.png":
        "the same experiment on shapes24: ~3 h of both cores; the driver is tested at toy size (see above).",
    "make test": "runs the test suite, this file included (python -m pytest -q -n 2 --dist loadfile tests after the "
                 "venv install, which needs the network or a wheel cache).",
    "make bench": "25-35 min of wall-clock measurements (benchmarks/run.py, then benchmarks/large_vocab.py and "
                  "benchmarks/conv_layers.py); tests/integration/test_benchmarks.py runs the driver end to end at "
                  "toy size (run.py --smoke) and conv_layers.py at 64x64, tables included.",
    "python benchmarks/pod_memory.py": "compiles R-50/R-101 train steps at 1024x1024 on 8 fake devices (~10 min); "
                                       "tests/integration/test_benchmarks.py runs the same script on R-18 at 64x64, "
                                       "2 devices.",
}

# Paths the README takes from ``make demo`` -> the path a README command run here writes instead.
PATH_ALIASES: dict[str, str] = {}

# Whole-argument replacements: {README argument: argument run here}.
ARG_SUBSTITUTIONS: dict[str, str] = {
    # the README's training run checkpoints every 300 steps; the training commands here stop at steps 1 and 2.
    "runs/maskx_demo/checkpoints/300": "runs/maskx_demo/checkpoints/2",
}


@dataclasses.dataclass(frozen=True)
class SnippetPlan:
    """How a README Python snippet runs: text replacements (each must match), and code before/after it."""

    substitutions: tuple[tuple[str, str], ...]
    prelude: str
    epilogue: str


# {a string identifying the snippet: how it runs}. Every README snippet must match exactly one key.
SNIPPETS: dict[str, SnippetPlan] = {
    "load_exported(": SnippetPlan(
        substitutions=(), prelude="",
        epilogue="assert type(model).__name__ == 'MaskRCNN', type(model)\n"
                 "assert type(model.roi_heads.mask_predictor).__name__ == 'MaskXPredictor'\n"
                 "assert set(out) == {'boxes', 'labels', 'scores', 'masks'}\n"
                 "assert out['masks'].shape[2:] == image.shape[1:], (out['masks'].shape, image.shape)\n"
                 "print('snippet ok:', len(out['boxes']), 'detections in torchvision')\n",
    ),
    "load_detector(": SnippetPlan(
        # 800x1333 on an R-50 costs minutes of CPU; the code path is the same at 128.
        substitutions=(("min_size=800, max_size=1333, pad_to=(800, 1344)",
                        "min_size=128, max_size=128, pad_to=(128, 128)"),),
        # the reader's image: a COCO photo
        prelude="import glob\nimport numpy as np\nfrom PIL import Image\n"
                "image_uint8_hwc = np.asarray(Image.open(sorted(glob.glob('photos/*.jpg'))[0]).convert('RGB'))\n",
        epilogue="assert det.boxes.shape == (1, 100, 4) and det.masks.shape == (1, 100, 28, 28), det.boxes.shape\n"
                 "assert masks.dtype == bool and masks.shape == (int(v.sum()), int(h), int(w)), masks.shape\n"
                 "assert (int(h), int(w)) == image_uint8_hwc.shape[:2]\n"
                 "print('snippet ok:', int(v.sum()), 'detections')\n",
    ),
}

# ----------------------------------------------------------------------------- tiny-run overrides

TRAIN_ALWAYS = ("--progress=false", "--config.train.batch_size=2", "--config.train.warmup_steps=1",
                "--config.eval.max_images=2", "--config.eval.batch_size=2", "--config.eval.num_pictures=2",
                "--config.data.num_workers=0")  # in-process; worker processes: test_data_workers, test_sharding
TRAIN_STEPS = 1  # a command that sets train.steps itself runs TRAIN_STEPS + 1: it resumes the previous run
PAPER_SIZE_COUNTS = {"model.rpn_pre_nms_top_n_train": 64, "model.rpn_post_nms_top_n_train": 32,
                     "model.rpn_pre_nms_top_n_test": 64, "model.rpn_post_nms_top_n_test": 32,
                     "model.rpn_batch_size_per_image": 32, "model.roi_batch_size_per_image": 16,
                     "model.max_mask_rois_per_image": 8, "model.detections_per_img": 10, "data.max_instances": 32}
PAPER_SIZE_WIDTHS = {"model.fpn_channels": 32, "model.representation": 64, "model.mask_head_channels": 32,
                     "model.transfer_hidden": 32}
SMALL_IMAGES = {"data.min_size": 128, "data.max_size": 128, "data.pad_height": 128, "data.pad_width": 128}
PREDICT_APPEND = ("--no-progress", "--min-size", "128", "--max-size", "128", "--pad", "128x128")


def _flag_value(argv: tuple[str, ...], name: str) -> str | None:
    """The value of ``--name X`` / ``--name=X`` (the last one), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


def effective_config(argv: tuple[str, ...], cwd: str):
    """The config ``train.py`` would build: the ``--config`` file's ``get_config()`` with the command's
    ``--config.KEY=VALUE`` overrides (enough to decide the tiny-run overrides, not a full flag parser)."""
    assert _flag_value(argv, "--config"), f"train.py without --config: {' '.join(argv)}"
    path = os.path.join(cwd, _flag_value(argv, "--config"))
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # configs import each other as ``configs.X``
    spec = importlib.util.spec_from_file_location("_readme_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        key, raw = arg[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        try:
            node = config
            for p in parents:
                node = node[p]
            value = raw if isinstance(node[leaf], str) else ast.literal_eval(
                {"true": "True", "false": "False"}.get(raw.lower(), raw))
            node[leaf] = value
        except (KeyError, TypeError, ValueError, SyntaxError):
            continue  # a bad override: train.py itself reports it when the command runs
    return config


def _init_checkpoint_kind(config, cwd: str) -> str:
    """'' (none), or the ``kind`` in the init checkpoint's meta ('resnet', 'detector', 'box_detector', '?')."""
    path = config.train.init_checkpoint
    if not path:
        return ""
    try:
        with open(os.path.join(cwd, path, "maskx_meta.json")) as f:
            return str(json.load(f).get("kind", "?"))
    except (OSError, ValueError):
        return "?"


def train_overrides(argv: tuple[str, ...], cwd: str) -> list[str]:
    """What is appended to a README ``python train.py ...`` command (see the module docstring)."""
    config = effective_config(argv, cwd)
    sets_steps = any(a.startswith("--config.train.steps=") for a in argv)
    extra = list(TRAIN_ALWAYS) + [f"--config.train.steps={TRAIN_STEPS + int(sets_steps)}"]
    if config.model.depth >= 50:
        extra += [f"--config.{k}={v}" for k, v in PAPER_SIZE_COUNTS.items()]
        # A detector checkpoint fixes the FPN and box-head widths; a backbone one does not.
        if _init_checkpoint_kind(config, cwd) in ("", "resnet"):
            extra += [f"--config.{k}={v}" for k, v in PAPER_SIZE_WIDTHS.items()]
    if config.data.pad_height * config.data.pad_width > 128 * 128:
        extra += [f"--config.{k}={v}" for k, v in SMALL_IMAGES.items()]
    return extra


# ----------------------------------------------------------------------------- plans


@dataclasses.dataclass
class Plan:
    """What runs for one README item: ``argv`` (``python`` resolved on PATH) with ``env``, after ``prepare``."""

    argv: list[str]
    env: dict[str, str]
    how: str
    prepare: Callable[[str], None] | None = None


def _substituted(argv: tuple[str, ...]) -> list[str]:
    return [ARG_SUBSTITUTIONS.get(a, a) for a in argv]


def _prepare_torch_file(argv: tuple[str, ...]) -> Callable[[str], None]:
    def prepare(cwd: str) -> None:
        path = os.path.join(cwd, _flag_value(argv, "--checkpoint"))
        if not os.path.exists(path):  # the reader's own file: a random-weight stand-in
            make_torch_checkpoint(path, _flag_value(argv, "--arch"))
    return prepare


def _as_is(how: str):
    return lambda c: Plan(_substituted(c.argv), dict(c.env), how)


# (argv prefix, plan maker); the first matching prefix decides.
RULES: tuple[tuple[tuple[str, ...], Callable[[Command], Plan]], ...] = (
    (("python", "train.py"), lambda c: Plan(_substituted(c.argv), dict(c.env), "run + tiny-run overrides")),
    (("python", "-m", "maskx_jax.predict"),
     lambda c: Plan(_substituted(c.argv) + list(PREDICT_APPEND), dict(c.env), "run + " + " ".join(PREDICT_APPEND))),
    (("python", "-m", "convert.from_torch"),
     lambda c: Plan(_substituted(c.argv), dict(c.env), "run (random-weight torchvision file made first if absent)",
                    _prepare_torch_file(c.argv))),
    (("python", "-m", "convert.to_torch"), _as_is("run as written")),
    (("python", "-c"), _as_is("run as written")),
    (("mkdir",), _as_is("run as written")),
)


def plan_for(command: Command) -> Plan | None:
    for prefix, make in RULES:
        if command.argv[:len(prefix)] == prefix:
            return make(command)
    return None


def snippet_plan(snippet: Snippet) -> SnippetPlan | None:
    keys = [k for k in SNIPPETS if k in snippet.code]
    return SNIPPETS[keys[0]] if len(keys) == 1 else None


def snippet_source(snippet: Snippet, plan: SnippetPlan) -> str:
    code = snippet.code
    for old, new in plan.substitutions:
        assert old in code, f"README line {snippet.line}: the snippet no longer contains {old!r}; update SNIPPETS"
        code = code.replace(old, new)
    return plan.prelude + code + plan.epilogue


# ----------------------------------------------------------------------------- the tests


def _items():
    with open(README, encoding="utf-8") as f:
        return readme_items(f.read())


def test_every_readme_command_is_run_or_accounted_for():
    """Fails on a README command (or snippet) that no rule here runs and COVERED_ELSEWHERE does not list."""
    uncovered, commands = [], set()
    for item in _items():
        if isinstance(item, Snippet):
            if snippet_plan(item) is None:
                uncovered.append(f"line {item.line}: python snippet (add it to SNIPPETS)")
            continue
        commands.add(item.text)
        if item.text not in COVERED_ELSEWHERE and plan_for(item) is None:
            uncovered.append(f"line {item.line}: {item.text}")
    assert not uncovered, ("README commands neither run by tests/docs/test_readme_commands.py nor listed in its "
                           "COVERED_ELSEWHERE:\n  " + "\n  ".join(uncovered))
    stale = sorted(set(COVERED_ELSEWHERE) - commands)
    assert not stale, f"COVERED_ELSEWHERE lists commands the README no longer shows: {stale}"
    text = open(README, encoding="utf-8").read()
    stale_paths = [p for p in list(PATH_ALIASES) + list(ARG_SUBSTITUTIONS) if p not in text]
    assert not stale_paths, f"PATH_ALIASES / ARG_SUBSTITUTIONS name paths the README no longer shows: {stale_paths}"


def test_readme_blocks_parser():
    text = ("```bash\nmake demo    # comment\n             # more comment\nA=1 python x.py --a 'q # r' \\\n"
            "  --b=2   # tail\n```\n```console\n$ echo hi\nhi\n```\n```text\npython not_run.py\n```\n"
            "```python\nprint(1)\n```\n")
    items = readme_items(text)
    assert [getattr(i, "text", None) for i in items] == ["make demo", "A=1 python x.py --a 'q # r' --b=2",
                                                         "echo hi", None]
    assert items[1].env == (("A", "1"),) and items[1].line == 4 and items[3].code == "print(1)\n"


def test_train_overrides_keep_what_later_commands_rely_on(tmp_path):
    """Demo-sized configs keep their architecture (a later ``predict --config`` checks it against the run's
    config.json); paper-sized ones shrink, but never the widths an init detector checkpoint fixes."""
    demo = train_overrides(("python", "train.py", "--config", "configs/demo_synthetic.py", "--workdir", "w"), ROOT)
    assert not [a for a in demo if a.startswith("--config.model.")] and "--config.train.steps=1" in demo
    resumed = train_overrides(("python", "train.py", "--config", "configs/demo_synthetic.py", "--workdir", "w",
                               "--config.train.steps=200"), ROOT)
    assert "--config.train.steps=2" in resumed
    for kind, narrowed in (("resnet", True), ("box_detector", False), ("detector", False)):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "maskx_meta.json").write_text(json.dumps({"kind": kind}))
        extra = train_overrides(("python", "train.py", "--config", "configs/coco_voc2nonvoc_r50.py", "--workdir", "w",
                                 f"--config.train.init_checkpoint={tmp_path / kind}"), ROOT)
        assert "--config.model.roi_batch_size_per_image=16" in extra and "--config.data.pad_height=128" in extra
        assert ("--config.model.fpn_channels=32" in extra) == narrowed, kind
        assert not [a for a in extra if a.startswith("--config.model.depth")]


def _run(argv: list[str], env: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
    full_env = subprocess_env(**env)
    full_env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), full_env.get("PATH", "")])
    return subprocess.run(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_readme_commands_run(tmp_path):
    """Runs every README command and snippet in order in one stand-in checkout; all must exit 0."""
    resources.minicoco()  # the walk-through's COCO folder is made from it
    session = str(tmp_path / "checkout")
    os.makedirs(session)
    make_session(session, PATH_ALIASES)
    done: dict[str, int] = {}
    failures, timings = [], []
    for item in _items():
        start = time.perf_counter()
        if isinstance(item, Snippet):
            plan = snippet_plan(item)
            path = os.path.join(session, f"readme_snippet_line{item.line}.py")
            with open(path, "w") as f:
                f.write(snippet_source(item, plan))
            label, proc = f"python snippet (line {item.line})", _run(["python", path], {}, session)
        elif item.text in COVERED_ELSEWHERE:
            continue
        elif item.text in done:
            continue  # the same command again (e.g. a conversion shown in two sections): its output exists
        else:
            plan = plan_for(item)
            done[item.text] = item.line
            if plan.prepare is not None:
                plan.prepare(session)
            argv = plan.argv
            if argv[:2] == ["python", "train.py"]:
                argv = argv + train_overrides(tuple(argv), session)
            label, proc = item.text, _run(argv, plan.env, session)
        seconds = time.perf_counter() - start
        timings.append((seconds, label))
        if proc.returncode != 0:
            failures.append(f"README line {item.line}: {label}\nexit {proc.returncode}; output tail:\n"
                            f"{proc.stdout[-3000:]}")
    print("\nREADME command timings (s):\n" + "\n".join(f"  {s:6.1f}  {label[:150]}" for s, label in timings))
    assert not failures, f"{len(failures)} README command(s) failed:\n\n" + "\n\n".join(failures)
    # Spot checks that the commands did what the README says.
    assert os.path.isfile(os.path.join(session, "maskrcnn_back.pth"))
    assert os.path.isfile(os.path.join(session, "runs", "maskx_demo", "metrics.json"))
    results = json.load(open(os.path.join(session, "out", "results.json")))
    assert isinstance(results, list)
    # ~1.5 GB of torch files and R-50 checkpoints; kept only when something failed, for a look.
    shutil.rmtree(session, ignore_errors=True)  # links into the checkout are unlinked, never followed
