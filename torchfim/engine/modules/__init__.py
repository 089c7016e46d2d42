"""Per-module rules: which rule covers a module (docs/math.md §6).

Linear, Bilinear, Conv1d/2d/3d (any padding) and their transposes, Embedding, EmbeddingBag (sum, mean),
LayerNorm, RMSNorm, GroupNorm, InstanceNorm (affine), BatchNorm (eval), MultiheadAttention, RNN/GRU/LSTM and
their cells, PReLU, transformers' ``Conv1D`` (GPT-2's transposed Linear) and its mixture-of-experts layers
(routed, and Llama 4's dense) have rules of their own; any other module with trainable parameters gets the
generic rule (``torch.func`` over that module alone); the parameters an ``nn.ParameterList`` or ``nn.ParameterDict``
holds go with the module that reads them (:func:`held_for`). A layer whose weight is parametrized (weight norm) or
computed by one of torch's forward pre-hooks (pruning, the older weight and spectral norms) keeps its rule,
with the originals' gradients by the chain rule (:mod:`.parametrized`, :mod:`.hooked`). Adding a rule is one
module here and one line in :func:`rule_for`.
"""

from __future__ import annotations

from torch import nn

from .attention import PARAMETERS as ATTENTION_PARAMETERS
from .attention import AttentionRule, attention_supported
from .base import Call, Grads, Rule, runs_torch_forward
from .bilinear import BilinearRule, bilinear_supported
from .conv import ConvRule, conv_supported
from .dense_experts import DenseExpertsRule, dense_experts_supported
from .embedding import EmbeddingBagRule, EmbeddingRule, embedding_bag_supported, embedding_supported
from .experts import ExpertsRule, covered_names, experts_supported
from .generic import GenericRule, tensors_of
from .hooked import hooked_names, hooked_rule
from .linear import LinearRule
from .norm import BatchNormRule, NormRule, norm_supported, own_norm
from .parametrized import PREFIX, parametrized_names, parametrized_rule
from .prelu import PReLURule, prelu_supported
from .recurrent import RecurrentRule, recurrent_supported
from .transposed_linear import TransposedLinearRule, transposed_linear_supported

__all__ = ["Call", "Grads", "Rule", "GenericRule", "LinearRule", "rule_for", "owns_subtree", "held_for",
           "left_to_the_deepest", "tensors_of", "build_rules"]


def owns_subtree(module: nn.Module) -> bool:
    """Whether ``module``'s rule covers its sub-modules' parameters too (a multi-head attention uses
    ``out_proj``'s weight inside its own forward and never calls ``out_proj``, whether its own rule or
    the generic one covers it)."""
    return isinstance(module, nn.MultiheadAttention)


#: Modules that hold parameters for the module above, which reads them.
_PARAMETER_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
#: Modules that only hold others and, without a forward of their own, are never called.
_CONTAINERS = (*_PARAMETER_CONTAINERS, nn.ModuleList, nn.ModuleDict)


def _only_holds(module: nn.Module) -> bool:
    """Whether ``module`` is a container without a forward of its own (a subclass with one may be called)."""
    return isinstance(module, _CONTAINERS) and type(module).forward is nn.Module.forward


def held_for(model: nn.Module) -> dict[nn.Module, dict[str, nn.Parameter]]:
    """The parameters that an ``nn.ParameterList`` or ``nn.ParameterDict`` holds for the module that reads
    them: its nearest module above that is not a container without a forward of its own (it alone is ever
    called), by name below it (``"scales.0"``). A rule of that module's covers them from the start, with no
    coverage check's move."""
    modules = dict(model.named_modules())
    held: dict[nn.Module, dict[str, nn.Parameter]] = {}
    for path, module in modules.items():
        if not path or not isinstance(module, _PARAMETER_CONTAINERS):
            continue
        parts = path.split(".")
        depth = len(parts) - 1
        while depth > 0 and _only_holds(modules[".".join(parts[:depth])]):
            depth -= 1
        below = ".".join(parts[depth:])
        holder = held.setdefault(modules[".".join(parts[:depth])], {})
        holder.update({f"{below}.{n}": p for n, p in module.named_parameters(recurse=False)})
    return held


def build_rules(model: nn.Module, index_of: dict[int, int], moved: dict[str, tuple[nn.Module, str]],
                generic: set[nn.Module], looped: set[nn.Module], own_tensors: frozenset[nn.Module] = frozenset(),
                ) -> dict[nn.Module, Rule]:
    """A rule per module of ``model`` owning parameters of θ (``index_of``: parameter id → index).

    ``moved`` assigns parameters (full name → (module, local name)) to the generic rule of another
    module instead; the modules of ``generic`` get the generic rule instead of their own, the
    generic rules of those in ``looped`` compute one sample at a time (torch.func gave wrong numbers),
    and those of ``own_tensors`` do so by autograd on the parameters themselves
    (:attr:`.generic.GenericRule.on_own_tensors`).
    """
    taken = {index_of[id(p)] for n, p in model.named_parameters() if n in moved}
    owned: dict[nn.Module, dict[str, int]] = {}
    paths = {}
    claimed: set[nn.Module] = set()  # sub-modules whose parameters a rule above covers
    held = held_for(model)
    for path, module in model.named_modules():
        paths[module] = path
        if module in claimed:
            continue
        subtree, parametrized = owns_subtree(module), bool(parametrized_names(module))
        if subtree:
            claimed.update(m for m in module.modules() if m is not module)
        if parametrized:  # the originals go with the layer that uses them, never to the list that holds them
            claimed.update(module.parametrizations.modules())
        own = {n: index_of[id(p)] for n, p in module.named_parameters(recurse=subtree or parametrized)
               if id(p) in index_of and (subtree or "." not in n or (parametrized and n.startswith(PREFIX)))
               and not isinstance(module, _PARAMETER_CONTAINERS)}
        own.update({n: index_of[id(p)] for n, p in held.get(module, {}).items() if id(p) in index_of})
        own = {n: i for n, i in own.items() if i not in taken}
        if own:
            owned[module] = own
    left_to_the_deepest(owned, paths)
    extra: dict[nn.Module, dict[str, int]] = {}
    named = dict(model.named_parameters())
    for full, (module, local) in moved.items():
        extra.setdefault(module, {})[local] = index_of[id(named[full])]
    rules = {m: GenericRule(m, params, paths[m]) if m in generic else rule_for(m, params, paths[m])
             for m, params in owned.items() if m not in extra}
    for module, params in extra.items():
        rules[module] = GenericRule(module, {**owned.get(module, {}), **params}, paths[module])
    for module in (looped | own_tensors) & set(rules):
        rules[module].unbatchable = True
    for module in own_tensors & set(rules):
        rules[module].on_own_tensors = True
    return rules


def rule_for(module: nn.Module, params: dict[str, int], path: str) -> Rule:
    """The rule for ``module`` covering ``params`` (local name → index in θ). One that follows the module's class
    forward where a forward set on the instance runs is on probation, as for a subclass's own forward (its calls'
    outputs are compared with the class forward's too, :func:`..recording.strays`)."""
    rule = _rule_of(module, params, path)
    if "forward" in module.__dict__ and not isinstance(rule, GenericRule):
        rule.on_probation = True
    return rule


def _rule_of(module: nn.Module, params: dict[str, int], path: str) -> Rule:
    if (attention_supported(module) and set(params) <= set(ATTENTION_PARAMETERS) and "forward" not in module.__dict__
            and runs_torch_forward(module)):
        # (the rule binds the call's arguments by the class forward's names, which one set on the instance may not use)
        return AttentionRule(module, params, path)
    if recurrent_supported(module) and "forward" not in module.__dict__ and runs_torch_forward(module):
        return RecurrentRule(module, params, path)
    if experts_supported(module) and set(params) <= covered_names(module):
        return ExpertsRule(module, params)
    if dense_experts_supported(module) and set(params) <= {"gate_up_proj", "down_proj"}:
        return DenseExpertsRule(module, params)
    if parametrized_names(module):
        return parametrized_rule(module, params, _weight_and_bias_rule) or GenericRule(module, params, path)
    if hooked_names(module):
        return hooked_rule(module, params, _weight_and_bias_rule) or GenericRule(module, params, path)
    rule = _weight_and_bias_rule(module, params)
    if rule is None:
        return GenericRule(module, params, path)
    rule.on_probation = rule.on_probation or not runs_torch_forward(module) or own_norm(module)
    return rule


def _weight_and_bias_rule(module: nn.Module, params: dict[str, int], own: set[str] | None = None) -> Rule | None:
    """The rule of a layer whose trainable parameters are its own ``weight`` and ``bias`` (None: no rule);
    ``own``: the names of its tensors (its own parameters where not given)."""
    own = set(dict(module.named_parameters(recurse=False))) if own is None else own
    if not set(params) <= own or not set(params) <= {"weight", "bias"}:
        return None
    if isinstance(module, nn.Linear):
        return LinearRule(module, params)
    if bilinear_supported(module):
        return BilinearRule(module, params)
    if conv_supported(module):
        return ConvRule(module, params)
    if embedding_supported(module):
        return EmbeddingRule(module, params)
    if embedding_bag_supported(module):
        return EmbeddingBagRule(module, params)
    if norm_supported(module):
        # BatchNorm's rule records by its own formula in place of the class forward: a subclass's would never run
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm) and runs_torch_forward(module)
        return (BatchNormRule if batch_norm else NormRule)(module, params)
    if transposed_linear_supported(module):
        return TransposedLinearRule(module, params)
    if prelu_supported(module):
        return PReLURule(module, params)
    return None


def left_to_the_deepest(owned: dict[nn.Module, dict[str, int]], paths: dict[nn.Module, str]) -> None:
    """A parameter registered both in a module and in one of its sub-modules (BERT's masked-LM head keeps
    its output bias as ``predictions.bias`` and as ``predictions.decoder.bias``) stays with the sub-module
    only: a rule for the module above would count the sub-module's use a second time. A use by the module
    above itself is then uncovered, and the coverage check moves the parameter (as for any such use)."""
    holders: dict[int, list[nn.Module]] = {}
    for module, params in owned.items():
        for i in params.values():
            holders.setdefault(i, []).append(module)
    for i, modules in holders.items():
        for above in modules:
            prefix = paths[above] + "." if paths[above] else ""
            if any(m is not above and paths[m].startswith(prefix) for m in modules):
                owned[above] = {n: j for n, j in owned[above].items() if j != i}
    for module in [m for m, params in owned.items() if not params]:
        del owned[module]
