"""The per-module backend's coverage check: which rule covers each parameter, settled on the first batch.

:class:`CoverageCheck` is the part of :class:`.per_module.PerModuleBackend` that records a mini-batch
and, on the first one, checks the rules against autograd sample by sample (:mod:`.coverage`): calls
whose outputs do not carry the batch have their shared inputs spread (:mod:`.shared_inputs`) or their
parameters moved to a module above; rules on probation that miss give way to the generic rule; generic
rules that ``torch.func`` batches to wrong numbers loop; parameters that still miss move up. What it
settles is kept per user model (:data:`_COVERAGE`), so later backends on the same model skip the check.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .._words import agreeing
from ..errors import all_finite, warn_user
from .backend import Pieces
from .batch import Batch
from .coverage import (
    DETACHED,
    WRONGLY_BATCHED,
    cause_of,
    missed,
    moved_message,
    names_of,
    nearest_called,
    rounding_floors,
)
from .modules import Call, GenericRule, Rule, build_rules
from .modules.base import LAYOUTS
from .modules.batch_free import Shapes, shapes_without_batch
from .private_tree import settled_key
from .recording import STRAYED, ModuleRecording, record_calls
from .shared_inputs import (
    carries_batch,
    check_size,
    modules_carrying_batch,
    reads_either_way,
    same_output,
    shares_inputs,
    unbatched_calls,
)
from .vector_batching import ONE_BY_ONE, pulls_back_alike
from .view import ModelView, fewer_inputs

__all__ = ["CoverageCheck"]

#: Per user model: its parameters' identities and flags (θ is those that require gradients: one unfrozen
#: after the check may have a use that no rule covers) and its forward's signature (hooks, instance forwards:
#: :func:`.private_tree.forward_signature`), the parameters moved to another module's generic rule
#: by the coverage check, and the paths of the modules whose shared inputs are spread over the batch, of
#: those whose rule on probation failed, of those whose generic rule loops, (with its layout) of those
#: whose rows are read regrouped and of those whose generic rule differentiates the parameters themselves,
#: so that later calls on the same model skip the check.
_COVERAGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CoverageCheck:
    """Recording with the coverage check (module docstring); the state it settles."""

    view: ModelView
    #: Whether the caller takes ``backend=`` (:attr:`.modules.GenericRule.offers_functional` of every generic rule).
    offers_functional: bool

    def _init_coverage(self) -> None:
        """The check's state, from the cache where this model was checked before."""
        self.moved: dict[str, tuple[nn.Module, str]] = {}
        #: Modules called on inputs shared by every sample, recorded with them spread (:mod:`.shared_inputs`).
        self.shared: frozenset[nn.Module] = frozenset()
        self._unshared: set[nn.Module] = set()  # such modules whose spreading changed the output or failed the check
        #: Modules whose rule on probation (:attr:`.modules.Rule.on_probation`) failed: the generic rule instead.
        self.demoted: set[nn.Module] = set()
        #: Modules whose generic rule computes one sample at a time: torch.func batched them to wrong numbers.
        self.looped: set[nn.Module] = set()
        #: Modules whose generic rule differentiates the parameters themselves (:meth:`_on_own_tensors`).
        self.own_tensors: set[nn.Module] = set()
        #: Per module, the layouts of its rows (:data:`.modules.base.LAYOUTS`) whose reading fed other samples
        #: than the rule read: not tried again (with none left, its parameters move up, which the cache keeps). None:
        #: rows that read either way (:func:`.shared_inputs.reads_either_way`) read as they came.
        self.wrong_layouts: dict[nn.Module, set[str | None]] = {}
        #: Once checked: the layout each module's calls had in the check, on 2 inputs or more, and were found
        #: right in. Only those are read on later batches (and any on a batch of 1, whose rows are all its own).
        self.layout_of: dict[nn.Module, str] = {}
        #: Once checked: per module with a generic rule, its inputs found without the batch (:mod:`.modules.batch_free`).
        self.batch_free: dict[nn.Module, Shapes] = {}
        self._causes: dict[str, str] = {}  # name of each parameter the coverage check moved → its likely cause
        cached = _COVERAGE.get(self.view.user_model)
        self._key = settled_key(self.view.user_model)
        #: Whether a check ran on one input (batches of one need no other) and on two or more (all batches). One
        #: input cannot tell a sequence-first layer, a table read by position or a batching rule of torch that
        #: mixes samples from one that does not: a first call on one input, kept as checked, left later batches
        #: of several 4-65% off, silently (a review).
        self._one_checked = cached is not None and cached[0] == self._key
        self._verified = self._one_checked and cached[-1] > 1
        #: Whether several output vectors go back one backward each: torch's batched backward of them gave other
        #: numbers in the check (:mod:`.vector_batching`).
        self.one_by_one = self._one_checked and cached[-2]
        if self._one_checked and any(cached[1:-2]):  # checked before: reuse where its parameters are used
            modules = dict(self.view.model.named_modules())
            self.moved = {n: (modules[path], local) for n, (path, local) in cached[1].items()}
            self.shared = frozenset(modules[path] for path in cached[2])
            self.demoted = {modules[path] for path in cached[3]}
            self.looped = {modules[path] for path in cached[4]}
            self.layout_of = {modules[path]: layout for path, layout in cached[5].items()}
            self.own_tensors = {modules[path] for path in cached[6]}
            self.batch_free = {modules[path]: shapes for path, shapes in cached[7].items()}
        self.rules = self._build_rules(self.moved)

    def _build_rules(self, moved: dict[str, tuple[nn.Module, str]] | None = None) -> dict[nn.Module, Rule]:
        rules = build_rules(self.view.model, self.view.index_of, moved or {}, self.demoted, self.looped,
                            frozenset(self.own_tensors))
        for rule in rules.values():
            if isinstance(rule, GenericRule):
                rule.offers_functional = self.offers_functional
                rule.batch_free = self.batch_free.get(rule.module, frozenset())
        return rules

    # ------------------------------------------------------------------ recording
    def record(self, batch: Batch) -> ModuleRecording:
        rec = self._record(batch, clone=False)
        if any(c.versions != [t._version for t in c.taps] for _, c in rec.calls):
            rec = self._record(batch, clone=True)  # a later in-place op changed a tap
        unbatched = unbatched_calls(rec.calls, batch.size)
        if unbatched:
            if not self._spread_shared(batch, rec, unbatched):
                self._move(names_of(self.view.model, unbatched), rec)
            return self.record(batch)
        self.uses = {}
        for rule, _ in rec.calls:
            for i in rule.params.values():
                self.uses[i] = self.uses.get(i, 0) + 1
        values = rec.values.detach()  # −Inf: a class masked out of a categorical; NaN or +Inf the family refuses
        if not self._verified and all_finite(values.masked_fill(torch.isneginf(values), 0)):
            if batch.size == 1 and self._one_checked:
                return rec  # one input's rows are all its own, and its rules were checked on one before
            checked = check_size(rec.calls, batch.size)
            with fewer_inputs(checked, batch):
                few = self._record(batch.rows(slice(0, checked)), clone=True)
                substitutes_differ = self._substitutes_differ(few)
            if substitutes_differ or self._verify(few) or self._move_mixed_layouts(few):
                return self.record(batch)  # the rules changed: record again, and check the new ones too
            self.layout_of = {call.module: call.layout for _, call in few.calls if call.regrouped}
            self._keep(rec, checked, few)
            if checked == 1:
                return rec  # right for one input: checked again on the first batch of more
            if any(self.layout_of.get(call.module) != call.layout for _, call in rec.calls
                   if call.regrouped or call.module in self.layout_of):
                # the whole batch's rows looked like another layout as well (read first), or read either way
                # (sequence first with as many positions as inputs, read batch first before the check)
                return self.record(batch)
        return rec

    def _move_mixed_layouts(self, rec: ModuleRecording) -> bool:
        """Give the parameters of a module called both batch first and sequence first in the forward to the generic
        rule of a module above: later batches read one layout per module, and a call whose rows read either way (as
        many positions as inputs) was read in the other's (a review: 11-31% off, silently). True when some moved."""
        layouts: dict[nn.Module, set] = {}
        for rule, call in rec.calls:
            if rule.reads_regrouped_rows and not isinstance(rule, GenericRule):
                layouts.setdefault(call.module, set()).add(call.layout)
        # Folded rows lead with B·k > B rows, never read either way: only sequence first beside batch first is
        mixed = [(rule, call) for rule, call in rec.calls if {None, "sequence_first"} <= layouts.get(call.module, set())]
        names = names_of(self.view.model, mixed)
        if not names:
            return False
        for name in names:
            self._causes.setdefault(name, "layouts")
        self._move(names, rec)
        return True

    def _keep(self, rec: ModuleRecording, checked: int, few: ModuleRecording) -> None:
        """A check passed on ``checked`` inputs (``few``): say what it moved and which modules the batch's backward
        misses (once per check), and keep its rules for the model's later calls (for batches of one where ``checked``
        is 1), with the inputs of their generic rules that held no batch in it."""
        self._one_checked, self._verified = True, checked > 1
        arguments: dict[nn.Module, list] = {}
        for rule, call in few.calls:
            if isinstance(rule, GenericRule):
                arguments.setdefault(rule.module, []).extend(rule.input_dims(call))
        self.batch_free = {m: shapes_without_batch(a) for m, a in arguments.items()}
        for rule in self.rules.values():
            if isinstance(rule, GenericRule):
                rule.batch_free = self.batch_free.get(rule.module, frozenset())
        paths = {m: p for p, m in self.view.model.named_modules()}
        if self._causes:
            warn_user(moved_message({n: paths[self.moved[n][0]] for n in self._causes}, self._causes))
            self._causes = {}
        reached = {rule.module for rule, call in rec.calls if call.taps}  # a no_grad call beside a graded one is fine
        detached = sorted({paths[rule.module] or "the model" for rule, _ in rec.calls if rule.module not in reached})
        if detached:
            warn_user(DETACHED.format(modules=f"{agreeing(len(detached), 'module')} {', '.join(map(repr, detached))}"))
        _COVERAGE[self.view.user_model] = (self._key, {n: (paths[m], local) for n, (m, local) in self.moved.items()},
                                           [paths[m] for m in self.shared], [paths[m] for m in self.demoted],
                                           [paths[m] for m in self.looped],
                                           {paths[m]: layout for m, layout in self.layout_of.items()},
                                           [paths[m] for m in self.own_tensors],
                                           {paths[m]: shapes for m, shapes in self.batch_free.items()}, self.one_by_one,
                                           checked)

    def _record(self, batch: Batch, clone: bool) -> ModuleRecording:
        """One recorded forward of ``batch``; modules whose forward set on the instance computed something else than
        their class's on it (:data:`.recording.STRAYED`) get the generic rule first, on this batch and later ones."""
        rec = record_calls(self.view, self.rules, batch, clone, self._attends, self.shared, self._layouts)
        strayed = {call.module for _, call in rec.calls if call.cache.get(STRAYED)}
        if not strayed:
            return rec
        self._demote(strayed)
        cached = _COVERAGE.get(self.view.user_model)
        if cached is not None and cached[0] == self._key:  # settled before: later backends demote them from the start
            paths = {m: p for p, m in self.view.model.named_modules()}
            _COVERAGE[self.view.user_model] = (*cached[:3], [paths[m] for m in self.demoted], *cached[4:])
        return self._record(batch, clone)

    def _layouts(self, module: nn.Module) -> frozenset[str]:
        """The layouts ``module``'s rows may be read in: while checking, those not found wrong; once checked,
        the one the check saw."""
        if self._verified:
            return frozenset({self.layout_of[module]}) if module in self.layout_of else frozenset()
        wrong = self.wrong_layouts.get(module, set())
        if None in wrong:  # rows that read either way fed other samples read as they came: sequence first, if any
            return frozenset({"sequence_first"}) - wrong
        return LAYOUTS - wrong

    def _spread_shared(self, batch: Batch, rec: ModuleRecording, unbatched: list[tuple[Rule, Call]]) -> bool:
        """Spread over the batch the inputs of the ``unbatched`` calls that share theirs (position ids
        ``(1, T)``), where the model's output stays as it was; True when some were taken on."""
        new = {call.module for _, call in unbatched if shares_inputs(call)} - self.shared - self._unshared
        return bool(new) and self._spreads_alike(batch, rec, new)

    def _spreads_alike(self, batch: Batch, rec: ModuleRecording, new: set[nn.Module]) -> bool:
        """Record the modules ``new`` spread from now on, where the model's output stays as ``rec`` had it;
        else never (:attr:`_unshared`). Whether it stayed."""
        self.shared |= new
        try:
            same = same_output(self._record(batch, clone=True).values, rec.values)
        except Exception:  # noqa: BLE001 - the model's forward refused the spread tensors: keep them shared
            same = False
        if not same:
            self.shared -= new
            self._unshared |= new
        return same

    def _substitutes_differ(self, rec: ModuleRecording) -> bool:
        """Give the generic rule to the modules whose rule recorded them by its own formula
        (:attr:`.modules.Rule.substitutes_forward`) where the recorded output is not the model's own; True when
        it did (the rules changed)."""
        substitutes = {rule.module for rule, _ in rec.calls if rule.substitutes_forward}
        if not substitutes:
            return False
        with torch.no_grad():
            own = self.view.flat(self.view.to_tensor(rec.batch.call(self.view.model)))
        return not same_output(rec.values, own) and self._demote(substitutes)

    def _verify(self, rec: ModuleRecording) -> bool:
        """Move parameters whose per-sample gradients miss uses to the generic rule of a module above
        (above the module that holds them now, for one moved before), keeping each one's first cause. First,
        a rule on probation whose gradients miss (or that fails) gives way to its module's generic rule, and
        a module recorded with its shared inputs spread whose gradients miss is recorded without them.

        Returns True when the rules changed (the batch must be recorded, and the new rules checked, again):
        a module above may itself miss uses, e.g. when it returns outputs computed one from another.
        """
        odd = unbatched_calls(rec.calls, rec.batch.size)  # their leading dim only happened to equal the batch's
        if odd:
            self._move(names_of(self.view.model, odd), rec)
            return True
        if self._batched_over_vectors_wrongly(rec):
            return True
        v = torch.randn(rec.output.shape, dtype=rec.output.dtype, device=rec.output.device,
                        generator=torch.Generator(device=rec.output.device).manual_seed(0)).unsqueeze(1)
        params = [p for p in self.view.model.parameters() if id(p) in self.view.index_of]
        index = [self.view.index_of[id(p)] for p in params]
        per_sample: Pieces = {}
        probation = {rule.module for rule, _ in rec.calls if rule.on_probation}
        try:
            for rows, _, piece in self.pieces(rec, v):
                for i, g in piece.items():
                    per_sample.setdefault(i, g.new_zeros(rec.batch.size, g.shape[-1]))[rows] += g.sum(1)
        except Exception:  # a rule on probation read inputs its module's own forward takes otherwise
            raising = self._raising(rec, v, probation) if probation else set()
            if raising:  # before any layout: a module's generic rule reads its rows regrouped too
                return self._demote(raising)
            if self._reject_layouts([call for _, call in rec.calls if call.regrouped]):
                return True
            if not probation:
                raise
            return self._demote(probation)
        misses = self._misses(rec, v, params, [per_sample.get(i) for i in index])
        # A rule on probation that misses gives way first (its generic rule reads the rows regrouped as well:
        # a Linear subclass returning a tuple keeps them), then rows read regrouped that still miss come as they are.
        failed = {rule.module for rule, _ in rec.calls if rule.on_probation and set(misses) & set(rule.params.values())}
        if failed:
            return self._demote(failed)
        if self._reject_layouts([call for rule, call in rec.calls if call.regrouped and set(misses) & set(rule.params.values())]):
            return True  # its rows were not sample by sample (a sequence-first batch flattened): record them as they come
        if self._reject_layouts([call for rule, call in rec.calls
                                 if reads_either_way(call) and rule.reads_regrouped_rows
                                 and None not in self.wrong_layouts.get(call.module, ())
                                 and set(misses) & set(rule.params.values())]):
            return True  # as many positions as inputs, read batch first: a sequence-first module's, read so next
        if self._loop_wrongly_batched(rec, v, set(misses)):
            return True
        spread = {rule.module for rule, _ in rec.calls if rule.module in self.shared and set(misses) & set(rule.params.values())}
        if spread:  # the model reads a spread output across samples: record those calls as they come
            self.shared -= spread
            self._unshared |= spread
            return True
        causes = {self.view.layout.names[i]: "rows" if summed else cause_of(i, rec.calls)  # each → its likely cause
                  for i, summed in misses.items()}
        for name, cause in causes.items():
            self._causes.setdefault(name, cause)
        before = dict(self.moved)
        if causes:
            self._move(list(causes), rec)
        changed = self.moved != before or self._on_own_tensors(rec, set(misses))
        if misses and not changed:  # nothing left to try above them: the model mixes samples, or draws at random
            # says which, before any warning
            self.view.check_independent_unmoved(rec.batch, rec.values.detach(), 0, self.view.versions())
        return changed

    def _misses(self, rec: ModuleRecording, v: Tensor, params: list[nn.Parameter],
                got: list[Tensor | None]) -> dict[int, bool]:
        """:func:`.coverage.missed` by index in θ, a parameter's gap of rounding noise aside (looked at only where
        some miss: it costs a backward)."""
        index = [self.view.index_of[id(p)] for p in params]

        def noise(positions: set[int]) -> dict[int, float]:
            floors = rounding_floors(rec.calls, self._sensitivities(rec, v), {index[k] for k in positions})
            return {k: floors.get(index[k], 0.0) for k in positions}

        return {index[k]: summed for k, summed in missed(rec.output, v[:, 0], params, got, noise).items()}

    def _on_own_tensors(self, rec: ModuleRecording, misses: set[int]) -> bool:
        """Give the generic rules of the missed parameters that moved as high as they go (the model's own, or
        the highest module called with the batch) products by autograd on the parameters themselves: their
        stand-ins in the copy's slots miss a read through a name outside the model (a hook reading
        ``model.layer.weight`` from the enclosing scope). True when some were taken on."""
        stuck = {rule.module for rule, _ in rec.calls
                 if isinstance(rule, GenericRule) and not rule.on_own_tensors and misses & set(rule.params.values())}
        for name in [self.view.layout.names[i] for i in misses]:
            if self.moved.get(name, (None,))[0] in stuck:
                self._causes[name] = "global"
        if stuck:
            self.own_tensors |= stuck
            self.rules = self._build_rules(self.moved)
        return bool(stuck)

    def _reject_layouts(self, calls: list[Call]) -> bool:
        """Read the rows of the modules of ``calls`` in their layout no more (another one is tried next; with
        none left, their parameters move up, silently, as for any call whose outputs do not carry the batch);
        True when there were some."""
        for call in calls:
            self.wrong_layouts.setdefault(call.module, set()).add(call.layout)
        return bool(calls)

    def _batched_over_vectors_wrongly(self, rec: ModuleRecording) -> bool:
        """Check, for two random output vectors, that torch's batched backward of them gives one backward per
        vector's numbers (else pull them back one at a time from now on, :mod:`.vector_batching`), and that each
        generic rule's torch.func products, batched over samples and vectors, are its looped ones (else loop it):
        the miss check pulls one vector back alone, which runs no batching rule over vectors (``torch.cdist``'s
        backward in torch 2.13 is wrong there). True when a generic rule is looped from now on (the rules changed).
        Each generic rule is compared once (its loop costs a backward per sample and vector)."""
        pair = torch.randn((rec.output.shape[0], 2, *rec.output.shape[1:]), dtype=rec.output.dtype,
                           device=rec.output.device, generator=torch.Generator(device=rec.output.device).manual_seed(1))
        if not self.one_by_one and not pulls_back_alike(rec.output, [call for _, call in rec.calls], pair):
            self.one_by_one = True
            warn_user(ONE_BY_ONE)
        return self._loop_wrongly_batched(rec, pair, None)

    def _loop_wrongly_batched(self, rec: ModuleRecording, v: Tensor, misses: set[int] | None) -> bool:
        """Compute one sample at a time each generic rule among those of the missed parameters (``None``: every
        generic rule not compared before) whose torch.func products differ from autograd's (a batching rule of
        torch that gives wrong numbers, as PReLU's backward under nested vmap in torch 2.13); True when some were
        found."""
        suspects = [k for k, (rule, _) in enumerate(rec.calls)
                    if isinstance(rule, GenericRule) and not rule.unbatchable and rule.params
                    and (not rule.vectors_compared if misses is None else misses & set(rule.params.values()))]
        if misses is None:
            for k in suspects:
                rec.calls[k][0].vectors_compared = True
        if not suspects:
            return False
        sens = self._sensitivities(rec, v)
        wrong = {rec.calls[k][0].module for k in suspects if not rec.calls[k][0].batches_correctly(rec.calls[k][1], sens[k])}
        for module in wrong:
            warn_user(WRONGLY_BATCHED.format(self.rules[module].path, type(module).__name__))
        if wrong:
            self.looped |= wrong
            self.rules = self._build_rules(self.moved)
        return bool(wrong)

    def _raising(self, rec: ModuleRecording, v: Tensor, probation: set[nn.Module]) -> set[nn.Module]:
        """The modules of ``probation`` whose rule raises on its recorded calls alone (a Linear subclass
        returning a tuple, whose sensitivities the rule cannot read)."""
        raising = set()
        for (rule, call), s in zip(rec.calls, self._sensitivities(rec, v)):
            if rule.module in probation and any(t is not None for t in s):
                try:
                    rule.grads(call, s, slice(0, rec.batch.size))
                except Exception:  # noqa: BLE001 - the error says only that the rule does not fit this forward
                    raising.add(rule.module)
        return raising

    def _demote(self, modules: set[nn.Module]) -> bool:
        """Give ``modules`` the generic rule instead of their rule on probation; True (the rules changed)."""
        self.demoted |= modules
        self.rules = self._build_rules(self.moved)
        return True

    def _move(self, names: list[str], rec: ModuleRecording) -> None:
        """Give parameters ``names`` to the generic rule of the nearest called module with batched outputs, or
        with outputs batched but for some shared by every sample, which it then records spread."""
        carrying, spreading = modules_carrying_batch(self.view.model, rec.batch)
        spreading -= self._unshared
        called = {call.module for _, call in rec.calls if carries_batch(call, folded=True)} | carrying | spreading
        self.moved.update({n: nearest_called(self.view.model, n, self.moved.get(n), called) for n in names})
        self.rules = self._build_rules(self.moved)
        spread = {module for module, _ in self.moved.values()} & spreading - self.shared
        if spread and not self._spreads_alike(rec.batch, rec, spread):
            self._move(names, rec)  # on above them: the model reads those outputs otherwise once spread
