"""The generated protobuf code in pipeline/pb is up to date with protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"pipeline/pb is stale; run scripts/gen_protos.py\n{result.stderr}"


def test_kserve_field_numbers_match_triton() -> None:
    """The numbers tritonclient relies on (a renumbered field would still generate and pass the check above)."""
    from pipeline.pb import grpc_service_pb2 as kpb
    from pipeline.pb import model_config_pb2 as mcpb

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert kpb.DESCRIPTOR.package == "inference"
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics",
    }
    assert numbers(kpb.ModelInferRequest) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6, "raw_input_contents": 7,
    }
    assert numbers(kpb.ModelInferResponse) == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5, "raw_output_contents": 6,
    }
    assert numbers(kpb.ModelInferRequest.InferInputTensor) == {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5}
    assert numbers(kpb.InferParameter) == {
        "bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5,
    }
    assert numbers(kpb.InferTensorContents) == {
        "bool_contents": 1, "int_contents": 2, "int64_contents": 3, "uint_contents": 4, "uint64_contents": 5,
        "fp32_contents": 6, "fp64_contents": 7, "bytes_contents": 8,
    }
    assert numbers(kpb.ModelStatistics) == {
        "name": 1, "version": 2, "last_inference": 3, "inference_count": 4, "execution_count": 5,
        "inference_stats": 6, "batch_stats": 7,
    }
    assert numbers(kpb.InferStatistics)["compute_infer"] == 5 and numbers(kpb.StatisticDuration) == {"count": 1, "ns": 2}
    cfg = numbers(mcpb.ModelConfig)
    assert (cfg["name"], cfg["platform"], cfg["backend"], cfg["max_batch_size"], cfg["input"], cfg["output"]) == (1, 2, 17, 4, 5, 6)
    assert cfg["dynamic_batching"] == 11 and cfg["model_transaction_policy"] == 19
    assert numbers(mcpb.ModelInput)["dims"] == 4 and numbers(mcpb.ModelOutput)["dims"] == 3
    assert mcpb.TYPE_FP32 == 11 and mcpb.TYPE_BF16 == 14
