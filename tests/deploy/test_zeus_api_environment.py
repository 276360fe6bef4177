"""Each instance's environment file of roles/zeus_api as rendered: the engine settings, the GPU
group of each instance (tensor parallel) and vLLM's CPU core binding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.deploy.templating import render_role_template
from tests.support.live_server import REPO_ROOT

ROLE_DIR = REPO_ROOT / "roles" / "zeus_api"
HOST_FACTS = {
    "inventory_hostname": "gpu1",
    "ansible_default_ipv4": {"address": "10.0.0.21"},
    "ansible_processor_nproc": 8,
    "zeus_api_db_password": "a-real-password-for-tests",
    "zeus_api_secret_key": "k" * 40,
}


def environment(port: int, **settings: Any) -> dict[str, str]:
    text = render_role_template(
        ROLE_DIR,
        "etc/zeus/instances/instance.env.j2",
        {**HOST_FACTS, "zeus_api_port": port, **settings},
        Path(f"/etc/zeus/instances/{port}.env"),
    )
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: value.strip('"') for name, value in pairs}


def test_the_builtin_engine_is_the_default_and_writes_no_unset_vllm_limits() -> None:
    # CUDA_VISIBLE_DEVICES sorts first: it used to be glued to the "# Ansible managed" comment
    # above it (a whitespace-stripping template comment), so no instance was ever pinned.
    env = environment(8000)
    assert env["ZEUS_ENGINE"] == "builtin"
    assert env["ZEUS_TENSOR_PARALLEL_SIZE"] == "1"
    assert env["ZEUS_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert "ZEUS_KV_CACHE_GB" not in env and "ZEUS_MAX_MODEL_LEN" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ZEUS_DEVICE"] == "cpu"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_each_instance_gets_its_own_group_of_gpus_at_tensor_parallel_2() -> None:
    settings = {
        "zeus_api_engine": "vllm",
        "zeus_api_tensor_parallel_size": 2,
        "zeus_api_gpus": ["0", "1", "2", "3", "4", "5", "6", "7"],
        "zeus_api_instances": 4,
        "zeus_api_gpu_memory_utilization": 0.85,
        "zeus_api_max_model_len": 8192,
    }
    groups = [environment(8000 + index, **settings)["CUDA_VISIBLE_DEVICES"] for index in range(4)]
    assert groups == ["0,1", "2,3", "4,5", "6,7"]
    env = environment(8001, **settings)
    assert env["ZEUS_ENGINE"] == "vllm" and env["ZEUS_DEVICE"] == "cuda"
    assert env["ZEUS_TENSOR_PARALLEL_SIZE"] == "2"
    assert env["ZEUS_GPU_MEMORY_UTILIZATION"] == "0.85"
    assert env["ZEUS_MAX_MODEL_LEN"] == "8192"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_instances_sharing_a_gpu_keep_the_old_pinning() -> None:
    settings = {"zeus_api_gpus": ["0", "1"], "zeus_api_instances_per_gpu": 2, "zeus_api_instances": 4}
    assert [environment(8000 + index, **settings)["CUDA_VISIBLE_DEVICES"] for index in range(4)] == [
        "0",
        "0",
        "1",
        "1",
    ]


def test_vllm_on_the_cpu_binds_each_instance_to_its_own_cores() -> None:
    settings = {"zeus_api_engine": "vllm", "zeus_api_instances": 2, "zeus_api_kv_cache_gb": 2}
    first, second = environment(8000, **settings), environment(8001, **settings)
    assert (first["VLLM_CPU_OMP_THREADS_BIND"], second["VLLM_CPU_OMP_THREADS_BIND"]) == ("0-3", "4-7")
    assert first["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert first["ZEUS_KV_CACHE_GB"] == "2"
    parallel = environment(8001, **settings, zeus_api_tensor_parallel_size=2)
    assert parallel["VLLM_CPU_OMP_THREADS_BIND"] == "4-5|6-7"
