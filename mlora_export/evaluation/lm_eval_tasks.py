"""Per-rank scores on lm-evaluation-harness tasks, run by lm-eval itself on our one loaded model.

lm-eval (``pip install 'mlora-export[lm-eval]'``) evaluates a PEFT adapter one rank at a time as
``HFLM(pretrained=BASE, peft=SLICE)``: one base load per rank. Here its own ``HFLM`` wraps the
model :func:`~mlora_export.evaluation.evaluate` loaded once, whose nested adapter is switched to
each rank in place, and lm-eval's own task registry (``TaskManager``, with ``include_path`` for
task YAMLs of one's own), request building, filters and metrics score it. The tasks are loaded
once per call; before each rank the random seeds are set as ``lm_eval.simple_evaluate`` sets them
(its defaults, those of the ``lm_eval`` command), so each rank scores what a fresh ``lm_eval`` run
on that rank's PEFT slice scores (tests/test_lm_eval.py checks it metric for metric).

Metric names (:mod:`mlora_export.metric_names`): ``<task>:<metric>`` for a metric under the first
filter the task reports, ``<task>:<metric>:<filter>`` under the others; lm-eval's own key
(``metric,filter``) is kept next to each. Each requested task (or group) has a **headline**
metric, the first it reports (lm-eval's order: the task's ``metric_list``, then filters; a group
without aggregated metrics counts its tasks' headlines). With two or more headlines, all
fractions where higher is better, :data:`~mlora_export.metric_names.TASKS_MEAN` is their mean at
each rank (its AURAC is the mean of theirs).

``lm_eval`` is imported only here and only when tasks are asked for, so the package and
``--help`` stay fast without it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingExtraError
from ..metric_names import TASKS_MEAN, is_fraction, task_metric_name
from ..method import aurac
from ..params import param
from ..validate import is_int

logger = logging.getLogger(__name__)

#: The package extra that installs lm-eval.
LM_EVAL_EXTRA = "lm-eval"
_GLOB = set("*?[")
# lm-eval's warnings about a model passed as an object, which is what we mean to do
_QUIET = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")


@dataclass(frozen=True)
class LmEvalTasks:
    """Which lm-eval tasks to score every rank on, and how (lm-eval's own options of the same names);
    ``EvalOptions(lm_eval=LmEvalTasks(("gsm8k", "arc_easy"), num_fewshot=5))``. The fields with a
    flag are ``eval``'s ``--tasks`` options.

    ``task_manager``: an ``lm_eval.tasks.TaskManager`` built once and reused across calls (its index
    of every task YAML takes seconds to build); then ``include_path`` must be empty.
    """

    tasks: tuple[str, ...] | None = param(
        None, flag="--tasks", hint="see --tasks and --include-path", metavar="TASKS",
        help="lm-evaluation-harness tasks to score every rank on, comma-separated as lm_eval --tasks takes them (names, groups, "
             "tags, glob patterns, task YAML paths), e.g. gsm8k,arc_easy; lm-eval runs them on the one loaded model. "
             "Needs pip install 'mlora-export[lm-eval]'.")
    num_fewshot: int | None = param(None, flag="--num-fewshot", min=0,
                                    help="With --tasks: few-shot examples per prompt (default: each task's own; a task that fixes 0 keeps 0).")
    limit: int | None = param(None, flag="--limit", min=1, help="With --tasks: only the first N documents of each task.")
    apply_chat_template: bool = param(
        False, flag="--apply-chat-template",
        help="With --tasks: render prompts (few-shot examples as turns) with the tokenizer's chat template (or --chat-template).")
    include_path: tuple[str, ...] = param((), flag="--include-path",
                                          help="With --tasks: a folder of task YAML files added to lm-eval's registry (repeatable).")
    batch_size: int | None = param(None, help="lm-eval's batch size (default: the evaluation's batch_size).")
    task_manager: Any = field(default=None, compare=False, repr=False, metadata={
        "help": "An lm_eval.tasks.TaskManager to reuse (its index of every task YAML takes seconds to build); not with include_path.",
        "flag": None, "choices": None, "hint": None})

    @property
    def names(self) -> tuple[str, ...]:
        """The task specs (none when ``tasks`` is ``None``)."""
        return tuple(self.tasks or ())

    def check(self) -> "LmEvalTasks":
        """Validate the settings (no lm-eval import, no disk access but the include folders).

        Raises:
            ConfigError: no task, an empty name, a count that is not an integer in range, an
                include folder that does not exist, or both ``include_path`` and ``task_manager``.
        """
        tasks = self.tasks
        if tasks is None or isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t.strip() and t == t.strip() for t in tasks):
            raise ConfigError(f"tasks must be a non-empty list of lm-eval task names, got {tasks if tasks is None or isinstance(tasks, str) else list(tasks)!r}",
                              option="tasks")
        for name, value, low in (("num_fewshot", self.num_fewshot, 0), ("limit", self.limit, 1), ("batch_size", self.batch_size, 1)):
            if value is not None and (not is_int(value) or value < low):
                raise ConfigError(f"{name.replace('_', ' ')} must be an integer of at least {low}, got {value!r}", option=name)
        for folder in self.include_path:
            if not Path(folder).is_dir():
                raise ConfigError(f"include path {str(folder)!r} is not a folder of task YAML files", option="include_path", path=folder)
        if self.include_path and self.task_manager is not None:
            raise ConfigError("give include folders or a prebuilt task manager, not both (build the manager with them)", option="include_path")
        return self


def import_lm_eval() -> Any:
    """The ``lm_eval`` package.

    Raises:
        MissingExtraError: it is not installed (``extra``: :data:`LM_EVAL_EXTRA`).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (its own extra: torch, transformers, peft)
    except ImportError as e:
        raise MissingExtraError(f"evaluating lm-eval tasks needs lm-evaluation-harness, which is not installed ({e}); "
                                f"install it with: pip install 'mlora-export[{LM_EVAL_EXTRA}]'", package="lm_eval", extra=LM_EVAL_EXTRA) from e
    return lm_eval


@dataclass(frozen=True)
class TaskMetric:
    """One metric lm-eval reports for one task or group, under one filter."""

    name: str  #: ``<task>:<metric>`` or ``<task>:<metric>:<filter>``
    task: str
    metric: str
    filter: str
    key: str  #: lm-eval's key, ``metric,filter``
    higher_is_better: bool
    fraction: bool

    def to_dict(self) -> dict[str, Any]:
        return {"source": "lm-eval", "task": self.task, "lm_eval_metric": self.key or None, "higher_is_better": self.higher_is_better,
                "fraction": self.fraction}


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (lm-eval writes ``"N/A"`` for a missing stderr)."""
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and type(value).__module__ != "numpy"):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_metrics(results: Mapping[str, Any]) -> tuple[dict[str, TaskMetric], dict[str, dict[str, float | None]]]:
    """Our names for the metrics of one lm-eval ``results`` dict (what ``lm_eval.evaluator.evaluate`` returns).

    Returns ``(descriptors, scores)``, both keyed by name in lm-eval's order; a score is
    ``{"value": …, "stderr": …}`` (``None`` where lm-eval has no finite number).
    """
    metrics: dict[str, TaskMetric] = {}
    scores: dict[str, dict[str, float | None]] = {}
    hib = results.get("higher_is_better") or {}
    for task, entry in (results.get("results") or {}).items():
        first_filter: dict[str, str] = {}
        for key, value in entry.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr") or isinstance(value, str):
                continue
            first = first_filter.setdefault(metric, filt)
            name = task_metric_name(task, metric, None if filt == first else filt)
            higher = (hib.get(task) or {}).get(metric)
            metrics[name] = TaskMetric(name, task, metric, filt, key, higher if isinstance(higher, bool) else True,
                                       is_fraction(task_metric_name(task, metric)))
            scores[name] = {"value": _number(value), "stderr": _number(entry.get(f"{metric}_stderr,{filt}"))}
    return metrics, scores


@contextmanager
def _quiet_model_object_warnings() -> Iterator[None]:
    """Drop lm-eval's two warnings that a model was passed as an object (what we mean to do)."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_QUIET)

    log = logging.getLogger("lm_eval.models.huggingface")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _is_plain_name(spec: str) -> bool:
    return not spec.endswith(".yaml") and not (_GLOB & set(spec))


def _task_manager(spec: LmEvalTasks, metadata: dict[str, Any]) -> Any:
    """lm-eval's ``TaskManager`` for ``spec``: the one given, else a new one over the built-in tasks and
    ``include_path``. When every requested name is a task in ``include_path``, the index is built from
    those folders alone (seconds faster): a task builds the same from either index, since only groups
    and tags look names up in it."""
    from lm_eval.tasks import TaskManager

    if spec.task_manager is not None:
        return spec.task_manager
    include = [str(p) for p in spec.include_path] or None
    if include and all(_is_plain_name(t) for t in spec.names):
        local = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
        kinds = [getattr(getattr(local.task_index.get(t), "kind", None), "name", None) for t in spec.names]
        if all(k in ("TASK", "PY_TASK") for k in kinds):
            return local
    return TaskManager(include_path=include, metadata=metadata)


def _resolve(tm: Any, specs: Sequence[str]) -> list[str]:
    """Task names and YAML paths as ``lm_eval --tasks`` resolves them (glob patterns matched against the registry).

    Raises:
        ConfigError: names that match no task, group or tag, and YAML paths that are not files.
    """
    out: list[str] = []
    unknown: list[str] = []
    for spec in specs:
        if spec.endswith(".yaml"):
            found = [str(Path(spec).absolute())] if Path(spec).is_file() else []
        else:
            found = tm.match_tasks([spec])
        if not found:
            unknown.append(spec)
        out.extend(f for f in found if f not in out)
    if unknown:
        raise ConfigError(f"lm-eval knows no task, group or tag {', '.join(repr(u) for u in unknown)}; list them with "
                          "'lm-eval ls tasks', or add a folder of task YAML files with include_path", option="tasks")
    return out


class TaskSuite:
    """lm-eval tasks loaded once, scored on a model at one rank at a time (:meth:`score`).

    Build it with :meth:`prepare` before the model is loaded: it imports lm-eval, resolves and
    loads the tasks (datasets are read here, from the Hub where a task says so, as lm-eval does).
    """

    def __init__(self, spec: LmEvalTasks, task_manager: Any, loaded: Mapping[str, Any], tokenizer: Any, batch_size: int, version: str) -> None:
        self.spec, self.task_manager, self.loaded, self.tokenizer = spec, task_manager, loaded, tokenizer
        self.batch_size, self.version = batch_size, version
        #: every metric reported, by name (set by the first :meth:`score`)
        self.metrics: dict[str, TaskMetric] = {}
        #: the headline metric of each requested task or group, and whether :data:`TASKS_MEAN` is reported
        self.headlines: list[str] = []
        self.n_samples: dict[str, int] = {}
        self.n_shot: dict[str, Any] = {}
        self.versions: dict[str, Any] = {}

    @classmethod
    def prepare(cls, spec: LmEvalTasks, tokenizer_dir: str | os.PathLike[str], *, batch_size: int, chat_template: str | None = None) -> "TaskSuite":
        """Import lm-eval, resolve and load ``spec.tasks``, load lm-eval's tokenizer from ``tokenizer_dir``.

        The tokenizer is loaded as ``HFLM`` loads it from a path; ``chat_template`` (Jinja text),
        when given, replaces its template.

        Raises:
            MissingExtraError: lm-eval is not installed.
            ConfigError: bad settings (:meth:`LmEvalTasks.check`) or unknown task names.
            Exception: whatever lm-eval raises for a task it cannot load (a dataset it cannot
                download, a broken YAML), unchanged.
        """
        spec.check()
        lm_eval = import_lm_eval()
        import transformers

        tm = _task_manager(spec, {"pretrained": str(tokenizer_dir)})
        names = _resolve(tm, spec.names)
        loaded = tm.load(names)
        for task in loaded["tasks"].values():  # simple_evaluate's few-shot rule: an explicit 0 in the task stays
            if spec.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), revision="main", trust_remote_code=False, use_fast=True)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        return cls(spec, tm, loaded, tokenizer, spec.batch_size or batch_size, str(getattr(lm_eval, "__version__", "")))

    # -- one rank -----------------------------------------------------------------------------
    def run(self, model: Any) -> dict[str, Any]:
        """lm-eval's results dict for ``model`` as it is now (one rank), seeded as ``simple_evaluate`` seeds a run."""
        import random

        import numpy as np
        from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
        from lm_eval.evaluator import evaluate as lm_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import set_torch_seed

        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        set_torch_seed(DEFAULT_OTHER_SEED)
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
        with _quiet_model_object_warnings():
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        chat = self.spec.apply_chat_template
        return lm_evaluate(lm=lm, task_dict=self.loaded, limit=self.spec.limit, log_samples=False,
                           apply_chat_template=chat, fewshot_as_multiturn=chat)

    def score(self, model: Any, rank: int) -> dict[str, dict[str, float | None]]:
        """Every task metric of ``model`` at ``rank`` (the rank it is set to), by name, with :data:`TASKS_MEAN` when reported."""
        results = self.run(model)
        metrics, scores = read_metrics(results)
        if not self.metrics:
            self._describe(results, metrics)
        missing = [n for n in self.metrics if n != TASKS_MEAN and n not in scores]
        if missing:
            logger.warning("rank %d: lm-eval reported no %s", rank, ", ".join(missing))
        out = {n: scores.get(n, {"value": None, "stderr": None}) for n in self.metrics if n != TASKS_MEAN}
        if TASKS_MEAN in self.metrics:
            values = [out[h]["value"] for h in self.headlines]
            out[TASKS_MEAN] = {"value": None if any(v is None for v in values) else sum(values) / len(values), "stderr": None}  # type: ignore[arg-type,misc]
        logger.info("rank %d: %s", rank, ", ".join(f"{h} = {out[h]['value']}" for h in self.headlines))
        return out

    def _describe(self, results: Mapping[str, Any], metrics: dict[str, TaskMetric]) -> None:
        """Fix the metric set and the headlines from the first results."""
        self.metrics = dict(metrics)
        groups, tasks = self.loaded.get("groups") or {}, self.loaded["tasks"]
        children = {c for kids in (self.loaded.get("group_map") or {}).values() for c in kids}
        top = [g for g in groups if g not in children] + [t for t in tasks if t not in children]
        group_map = self.loaded.get("group_map") or {}

        def headlines(item: str) -> list[str]:
            own = [m.name for m in metrics.values() if m.task == item]
            if own:
                return own[:1]
            return [h for child in group_map.get(item, []) for h in headlines(child)]

        self.headlines = [h for item in top for h in headlines(item)]
        if len(self.headlines) >= 2 and all(metrics[h].higher_is_better and metrics[h].fraction for h in self.headlines):
            self.metrics[TASKS_MEAN] = TaskMetric(TASKS_MEAN, "tasks", "mean", "none", "", True, True)
        self.n_samples = {t: int(v.get("effective", 0)) for t, v in (results.get("n-samples") or {}).items() if isinstance(v, Mapping)}
        self.n_shot = dict(results.get("n-shot") or {})
        self.versions = dict(results.get("versions") or {})

    # -- the report ---------------------------------------------------------------------------
    @property
    def primary(self) -> str:
        """The metric of a run without data of our own: the first headline."""
        return self.headlines[0] if self.headlines else next(iter(self.metrics), "")

    def describe(self) -> dict[str, Any]:
        """The ``lm_eval`` section of ``results.json``: settings, tasks, metric descriptors and headlines."""
        return {
            "version": self.version,
            "tasks": list(self.spec.names),
            "num_fewshot": self.spec.num_fewshot,
            "limit": self.spec.limit,
            "apply_chat_template": self.spec.apply_chat_template,
            "include_path": [str(p) for p in self.spec.include_path],
            "batch_size": self.batch_size,
            "n_shot": self.n_shot,
            "n_samples": self.n_samples,
            "versions": self.versions,
            "headlines": list(self.headlines),
            "metrics": {
                name: {**m.to_dict(), **({"of": list(self.headlines)} if name == TASKS_MEAN else {})}
                for name, m in self.metrics.items()
            },
        }

    def examples(self, name: str) -> int | None:
        """The number of documents scored for metric ``name`` (a group: the sum over its tasks)."""
        m = self.metrics.get(name)
        if m is None or name == TASKS_MEAN:
            return None
        if m.task in self.n_samples:
            return self.n_samples[m.task]
        kids = (self.loaded.get("group_map") or {}).get(m.task)
        return sum(self.n_samples.get(k, 0) for k in kids) if kids else None


def metric_aurac(ranks: Sequence[int], values: Sequence[float | None]) -> dict[str, float] | None:
    """AURAC v1/v2 of one metric over ``ranks``; ``None`` when a value is missing (no finite number)."""
    if not ranks or any(v is None for v in values):
        return None
    return aurac(list(ranks), [float(v) for v in values])  # type: ignore[arg-type]


__all__ = ["LM_EVAL_EXTRA", "LmEvalTasks", "TaskMetric", "TaskSuite", "import_lm_eval", "metric_aurac", "read_metrics"]
