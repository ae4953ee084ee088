import pytest
from tests.helpers.models import train_phrase_model


@pytest.fixture(scope="session")
def trained():
    """(a D = 3 model whose heads often agree with it, the stream it learned): trained once for
    the decoding tests of every module, which only read it (eval mode, no optimiser)."""
    return train_phrase_model()
