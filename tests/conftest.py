"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored afterwards): the models in the tests are tiny, and on a shared
    2-core machine extra threads only add synchronization, which costs seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def gl():
    """Skips a test where MuJoCo cannot open an offscreen GL context (no EGL / OSMesa)."""
    from torchrl_dreammpc.envs import make_base_env

    env = make_base_env("pendulum-swingup", seed=0)
    env.reset()
    try:
        env.render(8, 8)
    except RuntimeError as err:
        pytest.skip(f"MuJoCo has no offscreen GL backend here: {err}")
    finally:
        env.close()
