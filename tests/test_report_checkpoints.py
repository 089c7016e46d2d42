"""``torchfim report --checkpoint`` with the checkpoints training libraries write: Hugging Face folders
(``save_pretrained``, a ``Trainer``'s ``checkpoint-N``, sharded or not, with tied weights written once),
``.safetensors`` files, and state dicts whose keys carry a wrapper's prefix (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``, a Lightning module's attribute).

Oracle: the model's parameters after loading equal those of the model the checkpoint was written from, exactly
(and, for Hugging Face folders, those ``from_pretrained`` loads); the report's exact Tr(F) is the library's on the
model with those weights.
"""

from __future__ import annotations

import json

import clients
import pytest
import torch
from report_fixtures import USER_MODULE, fast_figures, user_dir  # noqa: F401  (fixtures)
from torch import nn

import torchfim
from torchfim import cli
from torchfim.report.load import apply_checkpoint, apply_state_dict, load_checkpoint

safetensors_torch = clients.need("safetensors.torch")  # installed with transformers
assert USER_MODULE


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_a_wrappers_prefix_is_stripped(tmp_path, prefix: str) -> None:
    saved = _net(1)
    torch.save({"state_dict": {prefix + k: v for k, v in saved.state_dict().items()}}, tmp_path / "c.pt")
    model = _net(2)
    apply_state_dict(model, load_checkpoint(tmp_path / "c.pt"), "c.pt", "hint")
    assert _same(model, saved)


def test_a_mismatch_names_the_keys_as_saved_or_the_prefix_read_away() -> None:
    other = {"encoder." + k: v for k, v in nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)).state_dict().items()}
    with pytest.raises(torchfim.TorchfimError, match=r"without their common prefix 'encoder\.'\): missing 2\.weight"):
        apply_state_dict(_net(2), other, "c.pt", "hint")
    unrelated = {"encoder.attn.q.weight": torch.zeros(5, 4)}  # stripping the prefix matches nothing either
    with pytest.raises(torchfim.TorchfimError, match=r"model: missing 0\.weight.*unexpected encoder\.attn\.q\.weight"):
        apply_state_dict(_net(2), unrelated, "c.pt", "hint")


class _Tied(nn.Module):
    """A token model whose output layer is its embedding (one tensor, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids)))).mean(1)


def test_a_tied_weight_written_once_is_loaded_through_its_other_name(tmp_path) -> None:
    torch.manual_seed(3)
    saved = _Tied()
    state = {k: v for k, v in saved.state_dict().items() if k != "head.weight"}
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    torch.manual_seed(4)
    model = _Tied()
    apply_state_dict(model, load_checkpoint(tmp_path), str(tmp_path), "hint")
    assert _same(model, saved) and model.head.weight is model.embed.weight
    del state["mix.bias"]  # a weight that is not tied is still missed
    with pytest.raises(torchfim.TorchfimError, match=r"missing mix\.bias"):
        apply_state_dict(_Tied(), state, "c", "hint")


def test_folders_without_weights_and_unreadable_files_name_the_fix(tmp_path) -> None:
    with pytest.raises(torchfim.TorchfimError, match="a folder without model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(torchfim.TorchfimError, match="not a safetensors file that can be read"):
        load_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(torchfim.TorchfimError, match="not an index with a weight_map"):
        load_checkpoint(tmp_path)


def test_a_pickled_distributed_wrapper_names_the_module_inside_it(tmp_path) -> None:
    """``torch.save(DistributedDataParallel(model), FILE)`` cannot be read outside a process group; the fix named
    was ``torch.save(model, FILE)``, what the user had done (a CLI trial)."""
    from processes import one_process_group

    with one_process_group():
        torch.save(nn.parallel.DistributedDataParallel(_net(1)), tmp_path / "ddp.pt")
    with pytest.raises(torchfim.TorchfimError, match=r"pickled DistributedDataParallel wrapper: save the model inside "
                                                     r"it, torch.save\(ddp.module.state_dict\(\), FILE\)"):
        load_checkpoint(tmp_path / "ddp.pt")


def _whole_module(model: nn.Module, folder) -> str:
    torch.save(model, folder / "whole.pt")
    return "whole.pt"


def _safetensors_folder(model: nn.Module, folder) -> str:
    (folder / "ckpt").mkdir()
    safetensors_torch.save_file(model.state_dict(), str(folder / "ckpt" / "model.safetensors"))
    return "ckpt"


@pytest.mark.parametrize("write", [_whole_module, _safetensors_folder], ids=["whole-module", "folder"])
def test_the_report_reads_the_checkpoint(user_dir, capsys, fast_figures, write):  # noqa: F811
    import umod

    model = umod.make()
    with torch.no_grad():
        model[0].weight.mul_(2)
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--checkpoint", write(model, user_dir),
                       "--variance-inputs", "8", "--max-block", "0", "--no-progress", "--out", "rep"])
    assert status == 0, capsys.readouterr().err
    R = json.loads((user_dir / "rep" / "report.json").read_text())
    X, _ = umod.data()
    assert R["trace"]["exact"] == pytest.approx(float(torchfim.fisher(model, X, structure="trace")), rel=1e-6)


@pytest.mark.parametrize("shard", [None, "4KB"], ids=["one-file", "sharded"])
def test_a_hugging_face_folder_loads_as_from_pretrained(tmp_path, shard) -> None:
    """GPT-2 ties its output layer to the token embedding and ``save_pretrained`` writes it once; sharded, an
    index lists the files. Before, the folder was "no such file" and the tied weight "missing"."""
    transformers = clients.need("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(5)
    saved = transformers.GPT2LMHeadModel(config)
    saved.save_pretrained(tmp_path, **({} if shard is None else {"max_shard_size": shard}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    torch.manual_seed(6)
    model = transformers.GPT2LMHeadModel(config)
    apply_state_dict(model, load_checkpoint(tmp_path), str(tmp_path), "hint")
    assert _same(model, transformers.GPT2LMHeadModel.from_pretrained(tmp_path)) and _same(model, saved)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_peft_adapter_folder_names_how_to_load_it(tmp_path) -> None:
    """peft's ``save_pretrained`` writes the adapter alone: the report cannot apply it to a model without the base
    model, so it says where to load it (before: "a folder without model.safetensors")."""
    transformers, peft = clients.need("transformers"), clients.need("peft")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    base = transformers.BertForSequenceClassification(config)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    lora.save_pretrained(tmp_path)
    with pytest.raises(torchfim.TorchfimError, match=r"a PEFT adapter folder.*PeftModel.from_pretrained"):
        load_checkpoint(tmp_path)


def test_a_folder_whose_keys_transformers_converts_loads_through_from_pretrained(tmp_path) -> None:
    """transformers 5 saves a mixture of experts in its original layout (one tensor per expert) and converts it when
    loading; where the saved keys do not match, the report loads such a folder through the model class's
    ``from_pretrained`` (before: "missing ...experts.gate_up_proj; unexpected ...block_sparse_moe.experts.0.w1.weight").
    A model that is not a transformers model gets the mismatch of the keys as saved."""
    transformers = clients.need("transformers")
    config = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=16)
    torch.manual_seed(7)
    saved = transformers.MixtralForCausalLM(config)
    saved.save_pretrained(tmp_path)
    assert not set(load_checkpoint(tmp_path)) <= set(saved.state_dict())  # the layout on disk is not the model's
    torch.manual_seed(8)
    model = transformers.MixtralForCausalLM(config)
    apply_checkpoint(model, load_checkpoint(tmp_path), tmp_path, "hint")
    assert _same(model, saved)
    with pytest.raises(torchfim.TorchfimError, match=r"does not match the model: missing 0\.weight"):
        apply_checkpoint(_net(1), load_checkpoint(tmp_path), tmp_path, "hint")  # not a transformers model


def test_a_folder_of_another_class_is_refused_not_filled_at_random(tmp_path) -> None:
    """A folder saved from the bare encoder, for a classifier: ``from_pretrained`` alone would initialise the
    classifier at random (with a logged note); the report refuses, naming the missing weights."""
    transformers = clients.need("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(torchfim.TorchfimError, match=r"from_pretrained leaves missing classifier\.bias, classifier\.weight$"):
        apply_checkpoint(transformers.BertForSequenceClassification(config), load_checkpoint(tmp_path), tmp_path, "h")
