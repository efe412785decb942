"""ErnieImageTransformer compiles as one graph (no break on the padding check), padded and unpadded."""
import pytest
import torch

from ernielab.image.config import ErnieImageConfig
from ernielab.image.transformer import ErnieImageTransformer


@pytest.mark.parametrize("padded", [False, True])
def test_fullgraph_compile_matches_eager(padded):
    torch.manual_seed(0)
    model = ErnieImageTransformer(ErnieImageConfig.tiny(in_channels=8, text_in_dim=24)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    x, t, text = torch.randn(2, 8, 4, 3), torch.tensor([5.0, 700.0]), torch.randn(2, 6, 24)
    lens = torch.tensor([6, 2]) if padded else torch.tensor([6, 6])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, text, lens), model(x, t, text, lens), rtol=1e-5, atol=1e-5)
