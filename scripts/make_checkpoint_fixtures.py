#!/usr/bin/env python3
"""Writes the checkpoint fixtures of test/checkpoint.test.ts with PyTorch itself.

    python3 scripts/make_checkpoint_fixtures.py test/fixtures/checkpoints

For each gate variant (rg, rg2, rg3) and weight dtype (fp32, bf16) it writes a directory
`<kind>-<dtype>/` laid out like the authors' released checkpoints:

    config.json           Hugging Face config with the TRIM-KV fields (tiny sizes)
    trimkv_weights.pth    torch.save of the gate weights' state dict (real key names)
    inputs.json           random gate inputs x [n, inputSize] (float32 values)
    expected.json         lam [n, kvHeads] computed by PyTorch (float32, F.logsigmoid)
    trimkv_weights.safetensors   the same tensors, when the `safetensors` package is present

The last layer's tensors are deliberately non-contiguous views (a transpose, a slice at an
offset of a larger storage, a stride-2 slice, two tensors sharing one storage), so that the
loader's handling of strides and storage offsets is exercised. fp32 fixtures save
`model.state_dict()` itself (an OrderedDict carrying `_metadata`), bf16 ones a plain dict.
Everything is seeded: rerunning gives the same tensors.
"""
import json
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 32
INTER = 16
KV_HEADS = 2
Q_HEADS = 4
HEAD_DIM = 8
LAYERS = 2
N_INPUTS = 6


class RetentionGate(nn.Module):
    """The reference "rg" / "rg2" gate: logsigmoid(W2 act(W1 x + b1) + b)."""

    def __init__(self, input_size):
        super().__init__()
        self.linear1 = nn.Linear(input_size, INTER, bias=True)
        self.linear2 = nn.Linear(INTER, KV_HEADS, bias=False)
        self.bias = nn.Parameter(torch.zeros(KV_HEADS))

    def forward(self, x):
        return F.logsigmoid(self.linear2(F.silu(self.linear1(x))) + self.bias)


class RetentionGate3(nn.Module):
    """The reference "rg3" gate: logsigmoid(down(act(gate y) * up(y)) + b)."""

    def __init__(self, input_size):
        super().__init__()
        self.gate_proj = nn.Linear(input_size, INTER, bias=False)
        self.up_proj = nn.Linear(input_size, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, KV_HEADS, bias=False)
        self.bias = nn.Parameter(torch.zeros(KV_HEADS))

    def forward(self, y):
        return F.logsigmoid(self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y)) + self.bias)


class Attn(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.retention_gate = gate


class Layer(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.self_attn = Attn(gate)


class Inner(nn.Module):
    def __init__(self, gates):
        super().__init__()
        self.layers = nn.ModuleList([Layer(g) for g in gates])


class Model(nn.Module):
    """Only the module path matters: keys come out as model.layers.{l}.self_attn.retention_gate.*"""

    def __init__(self, gates):
        super().__init__()
        self.model = Inner(gates)


def transposed(t):
    """Same values as t (2-D), stored column-major: stride (1, rows)."""
    base = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype)
    base.copy_(t.t())
    return base.t()


def offset_slice(t, before=3, after=5):
    """Same values as t, a view at storage offset `before` of a larger 1-D storage."""
    store = torch.full((before + t.numel() + after,), -7.0, dtype=t.dtype)
    store[before:before + t.numel()] = t.reshape(-1)
    return store[before:before + t.numel()].view(t.shape)


def stride2(t):
    """Same values as t (2-D), every other column of a wider matrix: stride (2 * cols, 2)."""
    base = torch.full((t.shape[0], 2 * t.shape[1]), 13.0, dtype=t.dtype)
    base[:, ::2] = t
    return base[:, ::2]


def shared(a, b, gap=4):
    """Views of a and b that share one storage (b starts `gap` elements after a ends)."""
    store = torch.zeros(a.numel() + gap + b.numel(), dtype=a.dtype)
    store[:a.numel()] = a.reshape(-1)
    store[a.numel() + gap:] = b.reshape(-1)
    return store[:a.numel()].view(a.shape), store[a.numel() + gap:].view(b.shape)


def make_gate(kind, dtype, seed, layer):
    torch.manual_seed(seed)
    input_size = HIDDEN if kind == 'rg' else KV_HEADS * 2 * HEAD_DIM
    gate = RetentionGate3(input_size) if kind == 'rg3' else RetentionGate(input_size)
    with torch.no_grad():
        for name, p in gate.named_parameters():
            if name == 'bias':
                # Spread z over both signs so lam covers near-0 and strongly negative values.
                p.copy_(torch.empty_like(p).uniform_(-2.0, 5.0))
            else:
                p.copy_(torch.randn_like(p) * (0.6 if p.dim() == 2 else 0.3))
    gate = gate.to(dtype)
    if layer == LAYERS - 1:
        # Replace the last layer's parameters by non-contiguous views of the same values.
        with torch.no_grad():
            if kind == 'rg3':
                gate.gate_proj.weight = nn.Parameter(transposed(gate.gate_proj.weight.detach()))
                gate.up_proj.weight = nn.Parameter(stride2(gate.up_proj.weight.detach()))
                w, b = shared(gate.down_proj.weight.detach(), gate.bias.detach())
                gate.down_proj.weight = nn.Parameter(w)
                gate.bias = nn.Parameter(b)
            else:
                gate.linear1.weight = nn.Parameter(transposed(gate.linear1.weight.detach()))
                gate.linear1.bias = nn.Parameter(offset_slice(gate.linear1.bias.detach()))
                w, b = shared(gate.linear2.weight.detach(), gate.bias.detach())
                gate.linear2.weight = nn.Parameter(w)
                gate.bias = nn.Parameter(b)
    return gate, input_size


def config_for(kind, dtype_name, index):
    return {
        'architectures': ['TrimKVQwen3ForCausalLM'],
        'model_type': 'qwen3',
        'hidden_size': HIDDEN,
        'intermediate_size': 64,
        'num_hidden_layers': LAYERS,
        'num_attention_heads': Q_HEADS,
        'num_key_value_heads': KV_HEADS,
        'head_dim': HEAD_DIM,
        'hidden_act': 'silu',
        'rms_norm_eps': 1e-6,
        'vocab_size': 128,
        'torch_dtype': 'bfloat16' if dtype_name == 'bf16' else 'float32',
        'retention_gate': kind,
        'retention_gate_intermediate_size': INTER,
        'retention_gate_bias_init': 10.0,
        'memory_size': 16 + 8 * index,
        'buffer_size': 4,
        'compress_memory': True,
        'compress_strategy': 'knorm_alpha' if index % 2 else 'alpha',
        'floor_budget_ratio': 0.25 if kind == 'rg3' else 0.0,
        'max_seq_len': 4096,
    }


def main(out_dir):
    torch.use_deterministic_algorithms(True)
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
        print('safetensors not installed: no .safetensors fixtures (the test writes its own)')
    index = 0
    for kind in ('rg', 'rg2', 'rg3'):
        for dtype_name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
            d = os.path.join(out_dir, f'{kind}-{dtype_name}')
            os.makedirs(d, exist_ok=True)
            gates = []
            input_size = None
            for layer in range(LAYERS):
                g, input_size = make_gate(kind, dtype, 1000 + 17 * index + layer, layer)
                gates.append(g)
            model = Model(gates)
            sd = model.state_dict()
            assert any(not t.is_contiguous() for t in sd.values()), 'expected non-contiguous tensors'
            assert any(t.storage_offset() > 0 for t in sd.values()), 'expected a storage offset'
            path = os.path.join(d, 'trimkv_weights.pth')
            torch.save(sd if dtype_name == 'fp32' else dict(sd), path)

            # Sanity: what we wrote loads back, with the weights_only loader, to the same values.
            back = torch.load(path, weights_only=True)
            for k, v in sd.items():
                assert torch.equal(back[k], v), k

            with open(os.path.join(d, 'config.json'), 'w') as f:
                json.dump(config_for(kind, dtype_name, index), f, indent=2)

            torch.manual_seed(4242 + index)
            x = torch.randn(N_INPUTS, input_size, dtype=torch.float32) * 1.5
            lams = []
            with torch.no_grad():
                for g in gates:
                    # float32 math on the weights as stored (bf16 values upcast exactly).
                    lams.append(g.float()(x).tolist())
            with open(os.path.join(d, 'inputs.json'), 'w') as f:
                json.dump({'shape': [N_INPUTS, input_size], 'x': x.tolist()}, f)
            with open(os.path.join(d, 'expected.json'), 'w') as f:
                json.dump(
                    {
                        'torch': torch.__version__,
                        'kind': kind,
                        'dtype': dtype_name,
                        'shape': [N_INPUTS, KV_HEADS],
                        'lam': lams,  # [layer][n][kvHeads]
                    },
                    f,
                )
            if save_file is not None:
                save_file({k: v.contiguous().clone() for k, v in sd.items()},
                          os.path.join(d, 'trimkv_weights.safetensors'), metadata={'format': 'pt'})
            print(f'wrote {d}')
            index += 1


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: make_checkpoint_fixtures.py OUT_DIR')
    main(sys.argv[1])
