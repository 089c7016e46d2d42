"""Report the Fisher information of a Hugging Face language model with its real vocabulary.

A causal language model's outputs are ``(batch, tokens, vocabulary)``: each token is an observation, and
one input has tokens × vocabulary output numbers (here 16 × 50,257). The exact Fisher and the closed-form
variances pull back about that many vectors per input, which would need thousands of GiB, so
``torchfim report`` says so and gives the score-only report: Tr(F) per layer by the score estimator with
standard errors from the spread of each input's labels, and the empirical Fisher (true next tokens)
beside it. ``torchfim.score_norms.squared_score_norms`` gives the numbers behind it.

The model is GPT-2 built from a config (random weights, no download; needs ``transformers``).

Run: python examples/language_model_report.py   (about half a minute on 2 cores: 24-30 s measured, shared machine)
"""

import torch
import transformers

import torchfim
import torchfim.report

torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50_257, n_positions=64)
model = transformers.GPT2LMHeadModel(config).eval()
ids = torch.randint(0, config.vocab_size, (8, 16))
mask = torch.ones_like(ids)
mask[::2, 12:] = 0  # every other sequence is 4 tokens shorter: padding, left out by mask="attention_mask"
batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

result = torchfim.report.run_report(model, batch, mask="attention_mask", out=None, progress=False, emit=None)
R, T = result["results"], result["results"]["trace"]
print(f"mode: {R['mode']}: {R['mode_reason'][:90]}...")
print(f"report:  Tr(F) = {T['trace_score_estimate']:.6g} ± {T['trace_score_stderr']:.2g}; "
      f"empirical Fisher {T['trace_empirical']:.6g}")

# The same numbers from the library: squared score norms per input, label and parameter tensor, over the positions
# the labels score (each next token; -100 and each sequence's last position observe nothing), as in the report.
norms = torchfim.score_norms.squared_score_norms(model, batch, n_samples=2, mask="attention_mask",
                                                 generator=torch.Generator().manual_seed(1))
estimate, stderr = norms.trace()
print(f"library: Tr(F) = {estimate:.6g} ± {stderr:.2g} ({norms.per_tensor.shape[1]} sequences, "
      f"{norms.per_tensor.shape[2]} labels per token, the report's seed)")
head = "transformer.wte.weight"  # the embedding table, tied to the output layer
print(f"{head}: Tr = {norms.trace(head)[0]:.4g} ({100 * norms.trace(head)[0] / estimate:.0f}% of Tr(F))")
