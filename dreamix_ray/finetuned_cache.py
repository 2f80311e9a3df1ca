"""One base cascade and the last few finetuned artifacts over it: what a batch step or a Serve deployment keeps
loaded, so rows of the same artifact do not reload it and rows of the base cascade share its weights.

A LoRA artifact is merged onto the one base in memory (finetune.attach -> adapters.merged_copy): its cascade
owns only the adapted layers' weights and shares everything else with the base, which never changes, so rows
of different artifacts give the same results in any order, and bringing an evicted artifact back costs a
merge (BENCHMARKS.md "LoRA artifacts"), not a load of the base."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .finetune import FinetuneConfig, finetuned_prompt, load_finetuned
from .models.cascade import Cascade
from .storage import ArtifactStore


class FinetunedCascades:
    """`get(artifact)` -> (cascade, prompt rewrite); the base loads on first use (a rerun that skips every
    row loads nothing), and the `size` most recently used artifacts stay in memory."""

    def __init__(self, load_base: Callable[[], Cascade], store: ArtifactStore, size: int = 2):
        self._load_base, self.store, self.size = load_base, store, size
        self._base: Cascade | None = None
        self._tuned: OrderedDict[str, tuple[Cascade, FinetuneConfig]] = OrderedDict()

    @property
    def base(self) -> Cascade:
        if self._base is None:
            self._base = self._load_base()
        return self._base

    def get(self, artifact: str | None) -> tuple[Cascade, Callable[[str], str]]:
        """The cascade for a row: the base, or the base with the artifact's stages swapped in (its prompts
        then name the artifact's token)."""
        if not artifact:
            return self.base, lambda prompt: prompt
        if artifact not in self._tuned:
            self._tuned[artifact] = load_finetuned(self.base, artifact, self.store)
            while len(self._tuned) > self.size:
                self._tuned.popitem(last=False)
        self._tuned.move_to_end(artifact)
        cascade, cfg = self._tuned[artifact]
        return cascade, lambda prompt: finetuned_prompt(prompt, cfg)
