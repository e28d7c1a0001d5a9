"""dsc.ir: the graph IR (types, graph, ops, verifier, printer, interpreter). Knows nothing of DeepSeek or ONNX."""

from dsc.ir.graph import Constant, Graph, GraphBuilder, Node, Op, Stacked, Transformed, Value, Weight, WeightSource
from dsc.ir.interpreter import Interpreter, interpret
from dsc.ir.printer import format_graph, format_node
from dsc.ir.types import DType, TensorType, dim_add
from dsc.ir.verify import VerifyError, verify

__all__ = [
    "Constant",
    "Stacked",
    "DType",
    "Graph",
    "GraphBuilder",
    "Interpreter",
    "Node",
    "Op",
    "TensorType",
    "Transformed",
    "Value",
    "VerifyError",
    "Weight",
    "WeightSource",
    "dim_add",
    "format_graph",
    "format_node",
    "interpret",
    "verify",
]
