"""Shared fixtures: tiny random-initialised Hugging Face models saved to disk."""
import pytest
import torch


def _save(model, folder, extra_files=None):
    model.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return folder


def make_bert(folder):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)])
    return _save(BertModel(cfg).eval(), folder, {"vocab.txt": vocab + "\n"})


def make_gpt2(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(cfg).eval(), folder)


def make_llama(folder, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    return _save(LlamaForCausalLM(cfg).eval(), folder)


MAKERS = {"bert": make_bert, "gpt2": make_gpt2, "llama": make_llama}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> folder of a tiny random model of that family."""
    root = tmp_path_factory.mktemp("hf")
    return {fam: make(root / fam) for fam, make in MAKERS.items()}
