"""vLLM's tool-call and reasoning parsers: the registries and the Qwen3 XML
parser classes the project's own tool-call parser builds on."""

from vllm.parser.qwen3 import Qwen3Parser
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.qwen3_engine_tool_parser import Qwen3EngineToolParser

__all__ = ["Qwen3EngineToolParser", "Qwen3Parser", "ReasoningParserManager", "ToolParserManager"]
