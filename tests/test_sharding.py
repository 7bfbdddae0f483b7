"""Data parallelism with JAX's own SPMD: a batch sharded over 4 forced CPU devices,
under plain `jit` and inside `shard_map` or `pmap` (`axis_name`)."""

import json
import os
import pathlib
import subprocess
import sys


def test_sharded_batch_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    script = pathlib.Path(__file__).with_name("sharded_check.py")
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["devices"] == 4 and result["input_shards"] == 4
    assert result["micro_all_gathers"] == 0, result
    for prefix in ("", "shard_map_"):
        assert result[f"{prefix}prediction_rows_per_device"] == 64 // 4, result
        assert result[f"{prefix}micro_prediction_rows_per_device"] == 64 // 4, result
        assert result[f"{prefix}micro_predictions"] <= 1e-6, result
    # float32: products, gradient and loss to 1e-6, a full optimizer step to 1e-5.
    names = ["mv", "grad", "loss", "lambda_max", "trace", "micro_mv"]
    names += [f"shard_map_{name}" for name in names]
    names += ["shard_map_unchecked_mv", "shard_map_unchecked_grad"]
    names += ["pmap_mv", "pmap_grad"]
    # Reverse mode only (jac="bwd") inside shard_map: products and gradient.
    names += ["bwd_shard_map_mv", "bwd_shard_map_grad"]
    for name in names:
        assert result[name] <= 1e-6, (name, result)
    assert result["micro_predictions"] <= 1e-6, result
    assert result["accepted"] and result["step"] <= 1e-5, result
    assert result["shard_map_accepted"] and result["shard_map_step"] <= 1e-5, result
    assert result["bwd_shard_map_step"] <= 1e-5, result
    assert result["bwd_shard_map_dense_step"] <= 1e-5, result
    # solver="dense": per-shard A^T A and one psum, or XLA's own sums under jit.
    # solver="kfac": factor sums psummed over the shards (shard_map) or by XLA.
    for prefix in ("", "shard_map_"):
        assert result[f"{prefix}dense_accepted"], result
        assert result[f"{prefix}dense_step"] <= 1e-5, result
        assert result[f"{prefix}kfac_accepted"], result
        assert result[f"{prefix}kfac_step"] <= 1e-5, result
        assert result[f"{prefix}kfac_quarter_step"] <= 1e-5, result
    # A NaN in one shard is a rejection on every device, parameters untouched.
    assert not result["shard_map_nan_accepted"], result
    assert result["shard_map_nan_params_unchanged"], result
