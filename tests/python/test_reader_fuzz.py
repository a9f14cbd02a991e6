"""The C++ model file reader against files written by the safetensors library: a valid file opens,
named corruptions give clear ModelFileError messages, random corruption never crashes."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from finequant import _core

QUANTIZATION = {
    "enc.0.q": {"part": "qkv", "weight_bits": 8, "weight_symmetric": True, "tile": [1, 8],
                "act_bits": 8, "act_symmetric": True},
    "enc.0.fc1": {"part": "fc1", "weight_bits": 4, "weight_symmetric": False, "tile": [1, 6],
                  "act_bits": 8, "act_symmetric": False},
    "enc.0.fc2": {"part": "fc2", "weight_bits": 0, "act_bits": 0},
}


def valid_tensors():
    return {
        "enc.0.q.weight": np.full((4, 8), -3, np.int8),
        "enc.0.q.weight_scale": np.full((4, 1), 0.5, np.float32),
        "enc.0.q.bias": np.arange(4, dtype=np.float32),
        "enc.0.fc1.weight": np.full((4, 4), 0x21, np.uint8),  # INT4: K = 8, blocks of 6 -> 2 scales
        "enc.0.fc1.weight_scale": np.full((4, 2), 0.25, np.float32),
        "enc.0.fc1.weight_zero_point": np.full((4, 2), 3, np.uint8),
        "enc.0.fc2.weight": np.ones((8, 4), np.float32),
        "embeddings.weight": np.ones((10, 8), np.float32),
    }


def valid_metadata(**overrides):
    meta = {"format": "finequant", "format_version": "1", "architecture": "bert",
            "config": json.dumps({"hidden_size": 8}), "scheme": "w8a8",
            "quantization": json.dumps(QUANTIZATION)}
    meta.update(overrides)
    return meta


def write(path, tensors=None, metadata=None):
    save_file(valid_tensors() if tensors is None else tensors, str(path),
              metadata=valid_metadata() if metadata is None else metadata)
    return str(path)


def split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def frame(header, body):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def edit_header(path, fn):
    """Rewrite the raw header of a written file (for corruptions the safetensors writer refuses)."""
    data = open(path, "rb").read()
    header, body = split(data)
    fn(header)
    open(path, "wb").write(frame(header, body))
    return path


def test_valid_file_opens(tmp_path):
    info = _core.open_model_file(write(tmp_path / "m.safetensors"))
    assert info["architecture"] == "bert"
    assert info["scheme"] == "w8a8"
    assert json.loads(info["config"]) == {"hidden_size": 8}
    assert info["metadata"]["format"] == "finequant"
    assert info["linears"]["enc.0.fc1"] == {"part": "fc1", "weight_bits": 4, "weight_symmetric": False,
                                            "tile": (1, 6), "act_bits": 8, "act_symmetric": False, "rotation": 0}
    assert info["linears"]["enc.0.fc2"]["tile"] is None
    assert set(info["tensor_names"]) == set(valid_tensors())

    meta, tensors = _core.read_safetensors(str(tmp_path / "m.safetensors"))
    assert meta == valid_metadata()
    for name, ref in valid_tensors().items():
        assert tensors[name].dtype == ref.dtype and np.array_equal(tensors[name], ref), name


def test_model_file_error_is_value_error():
    assert issubclass(_core.ModelFileError, ValueError)


def corrupt_cases():
    """(name, mutate(path) -> path, expected exception, message substring)."""
    def meta(**kw):
        return lambda p: write(p, metadata=valid_metadata(**kw))

    def tensors(**kw):
        def fn(p):
            t = valid_tensors()
            for k, v in kw.items():
                k = k.replace("__", ".")
                if v is None:
                    del t[k]
                else:
                    t[k] = v
            return write(p, tensors=t)
        return fn

    def header(fn):
        return lambda p: edit_header(write(p), fn)

    def raw(fn):
        def go(p):
            data = fn(open(write(p), "rb").read())
            open(p, "wb").write(data)
            return str(p)
        return go

    def set_field(name, key, value):
        return header(lambda h: h[name].__setitem__(key, value))

    quant_bad_part = dict(QUANTIZATION, **{"enc.0.q": dict(QUANTIZATION["enc.0.q"], part="gate")})
    return [
        ("empty", raw(lambda d: b""), "too short"),
        ("truncated data", raw(lambda d: d[:-3]), "past the"),
        ("truncated header", raw(lambda d: d[:40]), "exceeds the file size"),
        ("header length huge", raw(lambda d: struct.pack("<Q", 1 << 62) + d[8:]), "header length"),
        ("bad json", raw(lambda d: struct.pack("<Q", 9) + b"{not json"), "not valid JSON"),
        ("unknown dtype", set_field("enc.0.q.weight", "dtype", "F64"), "unsupported dtype 'F64'"),
        ("shape mismatch", set_field("enc.0.q.weight", "shape", [4, 9]), "bytes of data for shape [4, 9]"),
        ("overlap", header(lambda h: h["enc.0.q.bias"].__setitem__(
            "data_offsets", [h["enc.0.q.weight"]["data_offsets"][0], h["enc.0.q.weight"]["data_offsets"][0] + 16])),
         "overlap"),
        ("offsets past end", header(lambda h: h["enc.0.q.bias"].__setitem__("data_offsets", [10**6, 10**6 + 16])),
         "past the"),
        ("wrong format", meta(format="gguf"), "expected 'finequant'"),
        ("wrong version", meta(format_version="7"), "unsupported format_version 7"),
        ("config not json", meta(config="{"), "'config' is not valid JSON"),
        ("bad part", meta(quantization=json.dumps(quant_bad_part)), "unknown part 'gate'"),
        ("missing scale", tensors(enc__0__q__weight_scale=None), "missing tensor 'enc.0.q.weight_scale'"),
        ("wrong scale shape", tensors(enc__0__q__weight_scale=np.ones((2, 2), np.float32)),
         "'enc.0.q.weight_scale': expected F32 [4, 1], found F32 [2, 2]"),
        ("wrong weight dtype", tensors(enc__0__q__weight=np.zeros((4, 8), np.uint8)), "'enc.0.q.weight': expected I8"),
        ("missing zero point", tensors(enc__0__fc1__weight_zero_point=None),
         "missing tensor 'enc.0.fc1.weight_zero_point'"),
        ("wrong bias shape", tensors(enc__0__q__bias=np.zeros(5, np.float32)), "'enc.0.q.bias': expected F32 [4]"),
        ("gap between tensors", raw(_gap_before_last), "8 bytes between the data of tensors"),
        ("bytes after the data", raw(lambda d: d + bytes(8)), "8 bytes after the last tensor's data"),
        ("-128 in symmetric INT8", tensors(enc__0__q__weight=np.full((4, 8), -128, np.int8)),
         "'enc.0.q.weight' holds -128 at byte 0, outside the symmetric 8-bit range"),
        ("-8 in symmetric INT4", _symmetric_int4(0x18), "'enc.0.fc1.weight' holds -8 at byte 0"),
        ("-8 in a high nibble", _symmetric_int4(0x81), "'enc.0.fc1.weight' holds -8 at byte 0"),
    ]


def _gap_before_last(data):
    """Move the last tensor's data 8 bytes further, leaving bytes that belong to no tensor."""
    header, body = split(data)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 8, end + 8]
    return frame(header, body[:begin] + bytes(8) + body[begin:])


def _symmetric_int4(byte):
    """enc.0.fc1 as symmetric INT4 whose first stored byte is `byte` (0x8 nibbles are -8)."""
    def go(p):
        q = dict(QUANTIZATION, **{"enc.0.fc1": dict(QUANTIZATION["enc.0.fc1"], weight_symmetric=True)})
        t = valid_tensors()
        del t["enc.0.fc1.weight_zero_point"]
        t["enc.0.fc1.weight"] = np.full((4, 4), 0x21, np.uint8)
        t["enc.0.fc1.weight"][0, 0] = byte
        return write(p, tensors=t, metadata=valid_metadata(quantization=json.dumps(q)))
    return go


@pytest.mark.parametrize("name,mutate,substring", corrupt_cases(), ids=[c[0] for c in corrupt_cases()])
def test_named_corruptions(tmp_path, name, mutate, substring):
    path = mutate(tmp_path / "m.safetensors")
    with pytest.raises(_core.ModelFileError) as info:
        _core.open_model_file(path)
    assert substring in str(info.value)


def test_unknown_architecture_is_not_implemented(tmp_path):
    with pytest.raises(NotImplementedError, match="unsupported architecture 't5'"):
        _core.open_model_file(write(tmp_path / "m.safetensors", metadata=valid_metadata(architecture="t5")))


def test_random_corruption_never_crashes(tmp_path):
    good = open(write(tmp_path / "good.safetensors"), "rb").read()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.RandomState(20240601)
    path = tmp_path / "bad.safetensors"
    rejected = 0
    for _ in range(300):
        data = bytearray(good)
        mode = rng.randint(3)
        if mode == 0:
            data = data[:rng.randint(len(data))]
        else:
            for _ in range(rng.randint(1, 5)):
                # Mostly the header (where the validation lives), sometimes the tensor data.
                pos = rng.randint(header_end) if rng.rand() < 0.8 else rng.randint(len(data))
                data[pos] = data[pos] ^ (1 << rng.randint(8)) if mode == 1 else rng.randint(256)
        path.write_bytes(bytes(data))
        try:
            _core.open_model_file(str(path))
        except (ValueError, NotImplementedError):  # ModelFileError is a ValueError
            rejected += 1
    assert rejected > 100
