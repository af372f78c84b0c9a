"""strata: one inference engine for large language models, from a laptop CPU to several GPUs."""

__version__ = "0.1.0"

from strata.entrypoints.llm import LLM  # noqa: E402
from strata.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from strata.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
