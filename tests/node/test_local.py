"""The node's parts that need no swarm: identity files, weights, the ledger, adverts, engine fields."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import _encode_key

from cipherswarm.fhe_backend.int8_limbs import cpu_int8_gemm
from cipherswarm.fhe_backend.quant import WEIGHT_BITS, quantize_weight
from cipherswarm.node import IdentityError, Ledger, ModelMismatchError, ModelWeights, WeightsError, load_identity, load_model
from cipherswarm.node.discovery import model_key, now_ms, read_advert
from cipherswarm.node.engine import decode_params, encode_params, ENGINE
from cipherswarm.node.identity import hold_identity, peer_id_of, signing_key
from cipherswarm.node.provider import Provider, ProviderConfig, resolve_device
from cipherswarm.node.weights import check_digests, group_key, is_remote_layer
from cipherswarm.protocol import CapabilityAdvert, LayerShape, ProtocolError, UnsupportedParams, seal, sign_receipt
from cipherswarm.protocol.messages import UsageReceipt


class TestIdentity:
    def test_created_private_and_read_back(self, tmp_path: Path) -> None:
        path = tmp_path / "sub" / "id.key"
        key_pair, created = load_identity(path)
        assert created and (path.stat().st_mode & 0o777) == 0o600
        again, created = load_identity(path)
        assert not created and peer_id_of(again) == peer_id_of(key_pair)

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o666])
    def test_readable_by_others_is_refused(self, tmp_path: Path, mode: int) -> None:
        path = tmp_path / "id.key"
        load_identity(path)
        path.chmod(mode)
        with pytest.raises(IdentityError, match="chmod 600"):
            load_identity(path)

    def test_one_running_node_per_identity(self, tmp_path: Path) -> None:
        """A held identity is refused with the holder's pid; released (or left by a dead process), it is free."""
        path = tmp_path / "id.key"
        load_identity(path)
        with hold_identity(path):
            with pytest.raises(IdentityError, match=rf"another running node \(pid {os.getpid()}\).*--identity FILE"):
                with hold_identity(path):
                    pass
        (tmp_path / "id.key.lock").write_text("999999")  # a crashed node's file, not locked by anyone
        with hold_identity(path):
            assert (tmp_path / "id.key.lock").read_text() == str(os.getpid())

    def test_not_a_key_or_missing(self, tmp_path: Path) -> None:
        path = tmp_path / "id.key"
        path.write_bytes(b"not a key")
        path.chmod(0o600)
        with pytest.raises(IdentityError, match="not a libp2p private key"):
            load_identity(path)
        with pytest.raises(IdentityError, match="cipherswarm identity"):
            load_identity(tmp_path / "missing.key", create=False)


class TestWeights:
    def test_selection_rule(self) -> None:
        assert is_remote_layer("model.layers.0.self_attn.q_proj.weight", 2, True)
        assert is_remote_layer("transformer.h.0.attn.c_attn.weight", 2, True)
        for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight",
                     "model.layers.0.input_layernorm.weight", "transformer.h.0.ln_1.weight", "model.norm.weight"):
            assert not is_remote_layer(name, 2, True), name
        assert not is_remote_layer("model.layers.0.self_attn.q_proj.bias", 2, True)
        assert not is_remote_layer("model.layers.0.self_attn.q_proj.weight", 1, True)
        assert not is_remote_layer("model.layers.0.self_attn.q_proj.weight", 2, False)

    def test_llama_layers_digests_and_hash(self, weights: ModelWeights, model_dir: Path) -> None:
        from safetensors.torch import load_file

        assert len(weights.layers) == 14 and weights.holds_all  # 7 linear layers x 2 blocks
        tensors = load_file(str(model_dir / "model.safetensors"))
        q = weights.resolve("model.layers.0.mlp.up_proj")  # module name: what the trainer passes
        assert q is weights.resolve("model.layers.0.mlp.up_proj.weight")
        assert (q.shape.d_in, q.shape.d_out) == (64, 128)  # nn.Linear (out, in) transposed to the engine's (in, out)
        assert q.digest.hex() == quantize_weight(tensors[q.name].t()).digest
        part = load_model(model_dir, layers=["model.layers.1.*"])
        assert part.model_hash == weights.model_hash and len(part.held) == 7 and not part.holds_all
        assert part.lookup(weights.model_hash, (q.name,)) is None and weights.lookup(weights.model_hash, (q.name,)) == q.shape
        assert weights.lookup(b"x" * 32, (q.name,)) is None
        with pytest.raises(KeyError, match="not a remote layer"):
            weights.resolve("model.embed_tokens")

    def test_a_group_is_its_members_side_by_side(self, weights: ModelWeights, model_dir: Path) -> None:
        """gate|up: the concatenation's shape, digest, sums and norms, the same on a client that
        reads them from disk; lookups need every member held and one input width."""
        from cipherswarm.fhe_backend import WeightStats

        gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
        group = weights.resolve("model.layers.1.mlp.gate_proj+model.layers.1.mlp.up_proj")  # module names
        assert group is weights.resolve(f"{gate}+{up}") and group.name == f"{gate}+{up}"
        q = torch.cat([weights.read(gate).q, weights.read(up).q], dim=1).long()
        assert group.shape == LayerShape(64, 256) and group.digest.hex() == weights.read(group.name).digest
        assert torch.equal(weights.read(group.name).q.long(), q)
        assert torch.equal(group.sums[0], q.sum(0)) and torch.equal(group.sums[1], q.sum(1))
        assert group.stats[True] == WeightStats(int(q.abs().sum(1).max()), int((q * q).sum(1).max()))
        thin = load_model(model_dir, hold=False)
        assert thin.resolve(group.name).digest == group.digest and thin.resolve(group.name).stats == group.stats
        assert weights.lookup(weights.model_hash, (gate, up)) == LayerShape(64, 256)
        part = load_model(model_dir, layers=["model.layers.1.mlp.gate_proj"])
        assert part.lookup(weights.model_hash, (gate, up)) is None  # up is not held
        down = "model.layers.1.mlp.down_proj.weight"  # 128 -> 64: another input width
        assert weights.lookup(weights.model_hash, (gate, down)) is None and weights.lookup(weights.model_hash, (gate, gate)) is None
        with pytest.raises(WeightsError, match="same input width"):
            weights.resolve(f"{gate}+{down}")
        with pytest.raises(ValueError, match="distinct"):
            group_key([gate, gate])

    def test_weight_bits_name_the_model(self, weights: ModelWeights, model_dir: Path) -> None:
        """The width is in every digest and so in the model hash: nodes of other widths never match."""
        eight = load_model(model_dir, hold=False, weight_bits=8)
        assert eight.weight_bits == 8 and weights.weight_bits == WEIGHT_BITS and eight.model_hash != weights.model_hash
        layer = next(iter(weights.layers.values()))
        assert layer.weight is not None and layer.weight.q.dtype == torch.int16
        assert int(layer.weight.q.abs().max()) == (1 << (WEIGHT_BITS - 1)) - 1  # each column's largest weight
        assert eight.read(layer.name).q.dtype == torch.int8 and eight.read(layer.name).bits == 8
        with pytest.raises(ModelMismatchError, match="same weight bits on both sides"):
            check_digests(weights, {name: summary.digest for name, summary in eight.layers.items()})

    def test_a_client_keeps_summaries_that_match_the_weights_and_reads_them_again(self, weights: ModelWeights, model_dir: Path) -> None:
        """Sums and norms taken a slab at a time equal the whole-matrix int64 ones; a client holds no
        weight, and reading one back gives the held quantization."""
        from cipherswarm.fhe_backend import WeightStats

        thin = load_model(model_dir, hold=False)
        assert thin.model_hash == weights.model_hash and not thin.held
        for layer in weights.layers.values():
            q = layer.weight.q.long()  # type: ignore[union-attr]
            summary = thin.layers[layer.name]
            assert torch.equal(summary.sums[0], q.sum(0)) and torch.equal(summary.sums[1], q.sum(1))
            for t, axis in ((False, 0), (True, 1)):
                assert summary.stats[t] == WeightStats(int(q.abs().sum(axis).max()), int((q * q).sum(axis).max()))
            assert torch.equal(thin.read(layer.name).q, layer.weight.q)  # type: ignore[union-attr]
        wide = torch.randint(-5, 5, (600, 3), dtype=torch.int64)
        kept = wide.clone()
        WeightStats.of(wide)
        WeightStats.of(wide, transpose=True)
        assert torch.equal(wide, kept)  # the norms never work in the caller's tensor

    def test_conv1d_models_are_not_transposed(self, tmp_path: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(tmp_path)
        model = load_model(tmp_path)
        attn = model.resolve("transformer.h.0.attn.c_attn")
        assert (attn.shape.d_in, attn.shape.d_out) == (32, 96)
        assert "lm_head.weight" not in model.layers and "transformer.wte.weight" not in model.layers

    def test_bad_directories(self, tmp_path: Path, model_dir: Path) -> None:
        with pytest.raises(WeightsError, match="safetensors"):
            load_model(tmp_path)
        with pytest.raises(WeightsError, match="no layer matches"):
            load_model(model_dir, layers=["nothing.*"])


def _signed_receipt(request_id: bytes) -> object:
    provider, client = create_new_key_pair(), create_new_key_pair()
    receipt = UsageReceipt(
        provider=peer_id_of(provider).to_bytes(), client=peer_id_of(client).to_bytes(), request_id=request_id, request_digest=b"d" * 32,
        reply_digest=b"r" * 32, macs=3 * 10**9, price_per_gmac=5, completed_at_ms=now_ms(),
    )
    return sign_receipt(receipt, signing_key(provider))


class TestLedger:
    def test_one_row_per_request(self, tmp_path: Path) -> None:
        from cipherswarm.node.ledger import DuplicateReceipt

        with Ledger(tmp_path / "l.sqlite") as ledger:
            first = _signed_receipt(b"a" * 16)
            ledger.record(first, layer="l")  # type: ignore[arg-type]
            ledger.record(_signed_receipt(b"b" * 16), layer="l")  # type: ignore[arg-type]
            with pytest.raises(DuplicateReceipt):
                ledger.record(first, layer="l")  # type: ignore[arg-type]
        with Ledger(tmp_path / "l.sqlite") as ledger:
            assert [r.receipt.request_id for r in ledger.receipts()] == [b"a" * 16, b"b" * 16]
            assert ledger.total_amount() == 2 * 15

    def test_receipts_and_bans_wait_for_the_disk(self, tmp_path: Path) -> None:
        """synchronous=FULL (2) for receipts and bans, also after a track record was written
        without waiting (NORMAL, 1): a power loss cannot take back what was countersigned or banned."""
        from cipherswarm.node.ledger import TrackRecord

        with Ledger(tmp_path / "l.sqlite") as ledger:
            assert ledger.synchronous() == 2
            modes = []
            real = ledger._db  # the connection, to see the level each statement runs under

            class Watch:
                def execute(self, sql: str, *args: object) -> object:
                    if sql.startswith("INSERT"):
                        modes.append((sql.split()[2 if sql.startswith("INSERT INTO") else 4],
                                      real.execute("PRAGMA synchronous").fetchone()[0]))
                    return real.execute(sql, *args)

            ledger._db = Watch()  # type: ignore[assignment]
            ledger.save_record("p", TrackRecord(1, 0, 0.1, 1e9))
            ledger.record(_signed_receipt(b"c" * 16), layer="l")  # type: ignore[arg-type]
            ledger.ban("q", "cheated")
            ledger._db = real
            assert modes == [("peers", 1), ("receipts", 2), ("bans", 2)]
            assert ledger.synchronous() == 2


class TestAdverts:
    def _advert(self, key_pair: object, *, issued: int | None = None) -> bytes:
        issued = now_ms() if issued is None else issued
        advert = CapabilityAdvert(
            protocols=("/cipherswarm/matmul/1.0.0",), addrs=(), models=(b"m" * 32,), backends=("rlwe",), device="cpu",
            macs_per_second=1, price_per_gmac=0, free_slots=1, max_payload_size=1, issued_at_ms=issued,
            expires_at_ms=issued + 30_000, layers=(b"l" * 32,),
        )
        return seal(advert, signing_key(key_pair)).header  # type: ignore[attr-defined]

    def test_only_valid_unexpired_adverts_are_read(self) -> None:
        key_pair = create_new_key_pair()
        good = self._advert(key_pair)
        advert = read_advert(good)
        assert advert.peer == peer_id_of(key_pair) and advert.layers == {b"l" * 32} and advert.models == {b"m" * 32}
        with pytest.raises(ProtocolError):
            read_advert(self._advert(key_pair, issued=now_ms() - 60_000))  # expired
        with pytest.raises(ProtocolError):
            read_advert(good[:-1] + bytes([good[-1] ^ 1]))  # signature broken

    def test_model_key_is_the_multihash_libp2p_uses(self) -> None:
        key = model_key(b"m" * 32)
        assert _encode_key(key) == b"\x12\x20" + hashlib.sha256(b"/cipherswarm/model/1/" + b"m" * 32).digest()


class TestEngineFields:
    def test_params_round_trip_and_refusals(self) -> None:
        params = ENGINE.params_for(torch.randint(-127, 128, (16, 8)), 8)
        assert decode_params(encode_params(params)) == params
        for bad in (b"", b"1234567", encode_params(params)[:-8], b"\xff" * len(encode_params(params))):
            with pytest.raises(UnsupportedParams):
                decode_params(bad)

    def test_device_names(self) -> None:
        assert resolve_device("cpu") == "cpu"
        with pytest.raises(ValueError, match="cpu or cuda"):
            resolve_device("tpu")

    def test_cuda_falls_back_to_cpu_without_cupy(self, caplog: pytest.LogCaptureFixture) -> None:
        if importlib.util.find_spec("cupy") is not None:
            pytest.skip("cupy is installed: whether cuda is used depends on the GPU")
        assert resolve_device("cuda") == "cpu"
        assert "pip install 'cipherswarm[gpu]'" in caplog.text

    def test_gpu_providers_multiply_8_bit_weights_only(self, model_dir: Path, weights: ModelWeights,
                                                       monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        """int8 tensor cores take int8 weights: a GPU whose self-check passed serves wider ones on the CPU."""
        from cipherswarm.node.provider import service

        monkeypatch.setattr(service, "resolve_device", lambda requested: requested)  # as if the self-check passed
        cuda = ProviderConfig(device="cuda")
        assert Provider(weights=weights, key_pair=create_new_key_pair(), config=cuda).device == "cpu"
        assert f"these are {WEIGHT_BITS}-bit: computing on the CPU" in caplog.text
        eight = load_model(model_dir, weight_bits=8)
        assert Provider(weights=eight, key_pair=create_new_key_pair(), config=cuda).device == "cuda"

    def test_cuda_only_after_the_self_check(self, caplog: pytest.LogCaptureFixture) -> None:
        """A GEMM that reproduces the CPU (here the CPU's own, standing in for a GPU) is used; one
        that is wrong in a single int32 is logged and refused."""
        def off_by_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            out = cpu_int8_gemm(a, b)
            out[0, 0] += 1
            return out

        assert resolve_device("cuda", gpu_gemm=cpu_int8_gemm) == "cuda"
        assert resolve_device("cuda", gpu_gemm=off_by_one) == "cpu"
        assert "failed its self-check (its int8 GEMM differs from the CPU's)" in caplog.text


def test_the_estimates_client_memory_is_what_the_client_holds(weights: ModelWeights, model_dir: Path) -> None:
    """cipherswarm estimate's accounting of summaries, sketches and keys equals the bytes a real client
    holds for the same model once every channel the trainer calls is prepared: one per group (q|k|v,
    o, gate|up, down) and direction."""
    from cipherswarm.node.client.keys import KeyRing
    from cipherswarm.node.sim import Workload
    from cipherswarm.trainer.workload import traced_model

    thin = load_model(model_dir, hold=False)
    ring = KeyRing(thin)
    shape = traced_model(model_dir)
    ring.keep_only([(g.key, t) for g in shape.groups for t in (False, True)])
    memory = Workload(shape, tokens=2048, micro_batch_tokens=2048, seq_len=64).client_memory()
    assert memory["summaries"] == thin.summary_bytes()
    assert memory["sketches"] + memory["keys"] == ring.state_bytes()
