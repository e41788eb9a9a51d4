"""TorchRec's fused embedding-optimizer config, read for ESD tables.

TorchRec takes the embedding optimizer of a table from two places: the
sharder's ``fused_params`` (``{"optimizer": EmbOptimType.EXACT_SGD,
"learning_rate": 0.1}``) and ``apply_optimizer_in_backward(cls, ebc.parameters(),
kwargs)``, which tags every table weight with the class and its kwargs (the tag
wins over the sharder's config, as in TorchRec; ``lr`` means ``learning_rate``;
a config that names no optimizer means FBGEMM's default, ``EXACT_SGD`` at 0.01).

ESD's parameter servers apply the :class:`~torchrec_esd.optim.SparseOptimizer`
of the :class:`~torchrec_esd.distributed.runtime.EsdRuntime`: every rank, the PS ranks
included, agrees on it before any model exists.  :func:`fused_optimizer` turns
a table's TorchRec config into the :class:`SparseOptimizer` it means and
rejects, by name, the optimizers and options the PS does not run;
:func:`check_fused_optimizer` compares it with the runtime's, so that a config
that would train with another optimizer is an error instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_esd.config import EsdConfigError
from torchrec_esd.optim import SparseOptimizer

# the fused optimizers the parameter servers run, by FBGEMM type
SUPPORTED: Dict[EmbOptimType, str] = {
    EmbOptimType.EXACT_SGD: "sgd",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
}
SUPPORTED_TEXT = (
    "EXACT_SGD (torch.optim.SGD, torchrec.optim.SGD) and EXACT_ROWWISE_ADAGRAD "
    "(torchrec.optim.RowWiseAdagrad)"
)
# FBGEMM's defaults where the config leaves them out
DEFAULT_LR = 0.01
DEFAULT_EPS = 1e-8
# options that change the update unless they have these (no-op) values
_NO_OP = {
    "weight_decay": 0.0,
    "momentum": 0.0,
    "dampening": 0.0,
    "nesterov": False,
    "maximize": False,
    "lr_decay": 0.0,
    "initial_accumulator_value": 0.0,
}
# how torch.optim runs, not what it computes
_IMPLEMENTATION = {"foreach", "differentiable", "fused", "capturable"}


def _describe(opt: SparseOptimizer) -> str:
    extra = f", eps {opt.eps}" if opt.name == "rowwise_adagrad" else ""
    return f"{opt.name} (learning rate {opt.lr}{extra})"


def _runtime_text(opt: SparseOptimizer) -> str:
    return f"SparseOptimizer({opt.name!r}, lr={opt.lr}, eps={opt.eps})"


def fused_optimizer(
    fused_params: Optional[Mapping[str, Any]] = None,
    weight: Optional[torch.Tensor] = None,
    table: str = "?",
) -> Optional[SparseOptimizer]:
    """The :class:`SparseOptimizer` that TorchRec's config of ``table`` means:
    the sharder's ``fused_params`` overridden by ``apply_optimizer_in_backward``'s
    tag on ``weight``.  ``None`` when neither configures anything.

    Raises :class:`EsdConfigError` naming an optimizer or option that ESD's
    parameter servers do not run.
    """
    params: Dict[str, Any] = dict(fused_params or {})
    source = "the sharder's fused_params"
    classes = getattr(weight, "_optimizer_classes", None) if weight is not None else None
    if classes:
        if len(classes) != 1:
            raise EsdConfigError(
                f"table {table!r}: {len(classes)} optimizers applied in backward; TorchRec and ESD take one"
            )
        cls = classes[0]
        kwargs = dict(weight._optimizer_kwargs[0])  # type: ignore[union-attr]
        source = f"apply_optimizer_in_backward({cls.__module__}.{cls.__name__}, ...)"
        if "optimizer" not in kwargs:
            try:
                kwargs["optimizer"] = optimizer_type_to_emb_opt_type(cls)
            except ValueError:
                raise EsdConfigError(
                    f"table {table!r}: {source} asks for an optimizer TorchRec has no fused version of; "
                    f"ESD's parameter servers run {SUPPORTED_TEXT}"
                ) from None
        params.update(kwargs)
    if not params:
        return None
    if "lr" in params:
        params["learning_rate"] = params.pop("lr")
    kind = params.pop("optimizer", EmbOptimType.EXACT_SGD)
    if kind not in SUPPORTED:
        named = f"{kind.name}" if isinstance(kind, EmbOptimType) else repr(kind)
        raise EsdConfigError(
            f"table {table!r}: {source} asks for the fused optimizer {named}, which ESD's parameter "
            f"servers do not run; they run {SUPPORTED_TEXT} (pass the same one to the EsdRuntime's "
            "SparseOptimizer)"
        )
    lr = float(params.pop("learning_rate", DEFAULT_LR))
    eps = float(params.pop("eps", DEFAULT_EPS))
    for key, value in params.items():
        if key in _IMPLEMENTATION or (key in _NO_OP and value == _NO_OP[key]):
            continue
        raise EsdConfigError(
            f"table {table!r}: {source} sets {key}={value!r}, which ESD's parameter servers do not "
            f"apply (they take the optimizer, learning_rate / lr and eps; {sorted(_NO_OP)} only at "
            "their no-op values)"
        )
    return SparseOptimizer(SUPPORTED[kind], lr, eps)


def check_fused_optimizer(
    module: EmbeddingBagCollection,
    fused_params: Optional[Mapping[str, Any]],
    runtime_optimizer: SparseOptimizer,
) -> Optional[str]:
    """Why TorchRec's fused config of ``module``'s tables cannot train as
    configured under ESD (``None``: it can, or there is none).  The parameter
    servers apply ``runtime_optimizer``; a config must mean the same optimizer."""
    for t in module.embedding_bag_configs():
        weight = module.embedding_bags[t.name].weight
        try:
            want = fused_optimizer(fused_params, weight, t.name)
        except EsdConfigError as e:
            return str(e)
        if want is None:
            continue
        same = want.name == runtime_optimizer.name and want.lr == runtime_optimizer.lr
        if want.name == "rowwise_adagrad":
            same = same and want.eps == runtime_optimizer.eps
        if not same:
            return (
                f"table {t.name!r}: TorchRec's fused optimizer config asks for {_describe(want)}, but "
                f"the parameter servers apply the EsdRuntime's {_runtime_text(runtime_optimizer)}; "
                "configure the same optimizer in both (or only in the EsdRuntime)"
            )
    return None
