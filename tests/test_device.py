import pytest
import torch

from pipeline.device import choose_precision, resolve_device
from pipeline.errors import ConfigError

CUDA = torch.device("cuda")


def test_cpu_is_fp32():
    p = choose_precision(torch.device("cpu"))
    assert p.dtype == torch.float32 and not p.use_grad_scaler


@pytest.mark.parametrize("cap, dtype, scaler", [
    ((6, 0), torch.float16, True),    # P100
    ((7, 5), torch.float16, True),    # T4: is_bf16_supported() lies here, we do not ask it
    ((8, 0), torch.bfloat16, False),  # A100
    ((9, 0), torch.bfloat16, False),  # H100
])
def test_cuda_policy_by_compute_capability(cap, dtype, scaler):
    p = choose_precision(CUDA, "auto", capability=cap)
    assert (p.dtype, p.use_grad_scaler) == (dtype, scaler)


def test_forced_bf16_below_ampere_is_an_error_that_says_why():
    with pytest.raises(ConfigError, match=r"7\.5 < 8\.0.*emulated"):
        choose_precision(CUDA, "bfloat16", capability=(7, 5))
    assert choose_precision(CUDA, "bfloat16", capability=(8, 6)).dtype == torch.bfloat16
    assert choose_precision(CUDA, "float32", capability=(6, 0)).dtype == torch.float32


def test_unknown_precision_and_device():
    with pytest.raises(ConfigError, match="not one of"):
        choose_precision(torch.device("cpu"), "fp8")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
