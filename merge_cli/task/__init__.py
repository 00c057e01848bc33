"""The task interface: what the models compute, on which data, with which loss.

A recipe's ``task`` (or a model's own) names three things:

* ``model``: ``"module:function"`` or ``"path/to/file.py:function"`` returning an
  ``nn.Module`` whose ``state_dict`` names match the checkpoints, or ``"transformers"`` to
  build the architecture from the checkpoint's config.json (never running remote code);
* ``data``: a function ``(split) -> iterable of (inputs, targets)`` with split ``"train"``,
  ``"val"`` or ``"test"``;
* ``loss``: a built-in name (``cross_entropy``, ``mse``, ``causal_lm``) or a function
  ``(outputs, targets) -> scalar tensor``.

``task.params`` are passed as keyword arguments to the model and data functions.
Stages that need data (alignment, evaluation, data-aware merging, ensembles) all use this.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from merge_cli.errors import TaskError
from merge_cli.io.checkpoint import Checkpoint, read_state_dict
from merge_cli.recipe import TaskSpec

Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; ``labels`` are the input ids (-100 is ignored)."""
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[..., 1:].reshape(-1), ignore_index=-100)


LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "causal_lm": _causal_lm_loss,
}


def load_module(path: str | Path, what: str = "module") -> ModuleType:
    """Import a Python file by path, once per process (later calls return the same module)."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise TaskError(f"{what}: no such file {path}")
    name = "merge_cli_user_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, resolved)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise TaskError(f"{what}: importing {path} failed: {error!r}") from error
    return module


def load_callable(reference: str, what: str) -> Callable[..., Any]:
    """Import ``module:function`` or ``path/to/file.py:function``."""
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise TaskError(
            f"{what}: expected 'module:function' or 'file.py:function', got {reference!r}"
        )
    if target.endswith(".py"):
        module = load_module(target, what)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise TaskError(f"{what}: cannot import module {target!r}: {error}") from error
    try:
        function = getattr(module, attribute)
    except AttributeError:
        raise TaskError(f"{what}: {target} has no attribute {attribute!r}") from None
    if not callable(function):
        raise TaskError(f"{what}: {reference} is not callable")
    return function


#: The form each task function must have, for the error that names a wrong signature.
MODEL_FORM = "build(**task.params) -> nn.Module"
DATA_FORM = "data(split, **task.params) -> iterable of (inputs, targets)"


def _task_kwargs(function: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """The task params ``function`` accepts (all of them if it takes **kwargs)."""
    signature = inspect.signature(function)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in signature.parameters}


def check_signature(
    function: Callable[..., Any], params: dict[str, Any], args: tuple[Any, ...], where: str
) -> str | None:
    """Why ``function`` cannot be called with ``args`` and the task params it accepts, or
    ``None``: the check a wrong signature fails before the function runs."""
    form = DATA_FORM if args else MODEL_FORM
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: let the call decide
    try:
        signature.bind(*args, **_task_kwargs(function, params))
    except TypeError as error:
        return f"{where}: {function.__name__}{signature} cannot be called as {form} ({error})"
    return None


def _call_with_params(
    function: Callable[..., Any], params: dict[str, Any], where: str, *args: Any
) -> Any:
    """Call ``function`` with ``args`` and the task params it accepts; a signature that does
    not fit is one :class:`TaskError` naming the expected form."""
    problem = check_signature(function, params, args, where)
    if problem is not None:
        raise TaskError(problem)
    return function(*args, **_task_kwargs(function, params))


def task_problems(spec: TaskSpec, checkpoint: Checkpoint | None, where: str) -> list[str]:
    """What a run would refuse in ``spec`` for ``checkpoint``, found without running the
    task's code on data: functions that do not import or whose signature does not fit, and
    a model whose tensors' names or shapes differ from the checkpoint's headers (the model
    is built on the meta device: no memory, no initialisation)."""
    problems = []
    functions = [(spec.model, "model", ()), (spec.data, "data", ("train",))]
    for reference, key, args in functions:
        if reference is None or (key == "model" and reference == "transformers"):
            continue
        try:
            function = load_callable(reference, f"{where}.{key}")
        except TaskError as error:
            problems.append(str(error))
            continue
        problem = check_signature(function, spec.params, args, f"{where}.{key} {reference}")
        if problem is not None:
            problems.append(problem)
        elif key == "model" and checkpoint is not None:
            problems += _fit_problems(function, spec, checkpoint, where)
    if spec.loss not in LOSSES:
        try:
            load_callable(spec.loss, f"{where}.loss")
        except TaskError as error:
            problems.append(str(error))
    return problems


def _fit_problems(
    builder: Callable[..., Any], spec: TaskSpec, checkpoint: Checkpoint, where: str
) -> list[str]:
    """Tensors of ``checkpoint`` that the task's model lacks or holds in another shape."""
    try:
        with torch.device("meta"):
            model = builder(**_task_kwargs(builder, spec.params))
    except Exception:  # a builder that needs real tensors: the run checks it when it loads
        return []
    if not isinstance(model, nn.Module):
        return [f"{where}.model: {spec.model} returned {type(model).__name__}, not an nn.Module"]
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = []
    for name in checkpoint.tensor_names():
        shape = tuple(checkpoint.info(name).shape)
        if name not in expected:
            found.append(f"tensor {name!r} is not in the model")
        elif shape != expected[name]:
            found.append(
                f"tensor {name!r} has shape {list(shape)}, the model expects {list(expected[name])}"
            )
    if not found:
        return []
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return [
        f"{checkpoint.source}: does not fit {where}.model {spec.model} "
        f"(params {spec.params}): " + "; ".join(found[:3]) + more
    ]


@dataclass(frozen=True)
class Task:
    """A resolved task: build a model, get data, compute a loss."""

    spec: TaskSpec

    def build_model(self, checkpoint: Checkpoint | None = None) -> nn.Module:
        """An un-initialised model of the task's architecture (weights not loaded)."""
        if self.spec.model is None:
            raise TaskError("task.model: this stage needs a model builder")
        if self.spec.model == "transformers":
            return _transformers_model(checkpoint)
        builder = load_callable(self.spec.model, "task.model")
        model = _call_with_params(builder, self.spec.params, f"task.model {self.spec.model}")
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"task.model: {self.spec.model} returned {type(model).__name__}, not an nn.Module"
            )
        return model

    def load_model(self, checkpoint: Checkpoint, device: str = "cpu") -> nn.Module:
        """Build the architecture and load ``checkpoint``'s weights into it (strictly)."""
        model = self.build_model(checkpoint)
        state = read_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise TaskError(
                f"{checkpoint.source}: does not fit task.model {self.spec.model}: "
                f"{str(error).splitlines()[0]} ..."
            ) from error
        return model.to(device).eval()

    def data(self, split: str) -> Iterable[Batch]:
        if self.spec.data is None:
            raise TaskError("task.data: this stage needs data")
        function = load_callable(self.spec.data, "task.data")
        return _call_with_params(function, self.spec.params, f"task.data {self.spec.data}", split)

    @property
    def loss(self) -> LossFn:
        if self.spec.loss in LOSSES:
            return LOSSES[self.spec.loss]
        return load_callable(self.spec.loss, "task.loss")


def _transformers_model(checkpoint: Checkpoint | None) -> nn.Module:
    if checkpoint is None or checkpoint.directory is None:
        raise TaskError("task.model: 'transformers' needs a checkpoint directory with config.json")
    config_path = checkpoint.directory / "config.json"
    if not config_path.exists():
        raise TaskError(f"{checkpoint.source}: task.model 'transformers' needs {config_path}")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise TaskError(
            "task.model 'transformers' needs the transformers package: "
            "pip install 'merge-cli[transformers]'"
        ) from error
    config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=False)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def to_device(inputs: Any, device: str) -> Any:
    """Move a batch's inputs (a tensor, or a mapping / sequence of tensors) to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {key: to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(value, device) for value in inputs)
    return inputs


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, a transformers output's ``.logits``, or the
    first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TaskError(f"cannot find logits in a model's output ({type(outputs).__name__})")


def model_outputs(model: nn.Module, inputs: Any, device: str = "cpu") -> torch.Tensor:
    """Run ``model`` on one batch's inputs and return its logits.

    A mapping is passed as keyword arguments (a tokenizer's output for a transformers
    model); anything else as one argument. Outputs with a ``logits`` field (transformers'
    model outputs) are reduced to it.
    """
    inputs = to_device(inputs, device)
    outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return logits_of(outputs)
