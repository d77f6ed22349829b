"""The calculator tool the model calls between `<|python_start|>` and `<|python_end|>`.

It understands arithmetic on numbers (`+ - * / // % **`, unary signs, parentheses) and the string method the
spelling tasks use, `"strawberry".count("r")`. The text is parsed with `ast` and walked node by node; nothing
is ever passed to `eval`. Every operation is bounded before it runs (input length, exponent size, integer
width), so the tool needs no timeout and no signals, and is safe to call from a server's worker threads.

`calculate(expression)` always returns text: the result, or `error: ...` for anything it refuses.
"""
from __future__ import annotations

import ast
import math
import operator

MAX_INPUT_CHARS = 256
# Integer results wider than this are refused: 2**4096 has 1234 digits, far beyond any arithmetic task.
MAX_INT_BITS = 4096
MAX_FLOAT_EXPONENT = 1024

BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """An expression the calculator refuses; its message becomes the tool's `error: ...` output."""


def check_number(value: int | float | complex) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("number too large")
    return value


def check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power whose result would be huge before computing it (`9**9**9` must not run)."""
    if abs(exponent) > MAX_FLOAT_EXPONENT * 8:
        if abs(base) not in (0, 1):
            raise CalculatorError("exponent too large")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise CalculatorError("number too large")


def check_product(left: int | float, right: int | float) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise CalculatorError("number too large")


def evaluate_node(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Expression):
        return evaluate_node(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
            raise CalculatorError(f"unsupported constant {node.value!r}")
        return check_number(node.value) if isinstance(node.value, int) else node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        operand = evaluate_node(node.operand)
        if isinstance(operand, str):
            raise CalculatorError("arithmetic on text is not supported")
        return UNARY_OPS[type(node.op)](operand)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = evaluate_node(node.left), evaluate_node(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise CalculatorError("arithmetic on text is not supported")
        if isinstance(node.op, ast.Pow):
            check_power(left, right)
        if isinstance(node.op, ast.Mult):
            check_product(left, right)
        return check_number(BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return evaluate_count(node)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def evaluate_count(node: ast.Call) -> int:
    """Only `"text".count("sub")`: a string literal receiver, the `count` attribute, one string argument."""
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count"
            and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)):
        raise CalculatorError("only \"text\".count(\"x\") calls are supported")
    if node.keywords or len(node.args) != 1:
        raise CalculatorError(".count takes exactly one text argument")
    (arg,) = node.args
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        raise CalculatorError(".count takes exactly one text argument")
    return func.value.value.count(arg.value)


def format_result(value: int | float | str) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise CalculatorError("result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def calculate(expression: str) -> str:
    """Evaluate a calculator expression; returns the result text or `error: <reason>`, never raises."""
    text = expression.strip()
    if len(text) > MAX_INPUT_CHARS:
        return f"error: expression longer than {MAX_INPUT_CHARS} characters"
    if not text:
        return "error: empty expression"
    if "\"" not in text and "'" not in text:
        text = text.replace(",", "")  # thousands separators, as in "1,250 * 3"
    try:
        tree = ast.parse(text, mode="eval")
        return format_result(evaluate_node(tree))
    except CalculatorError as exc:
        return f"error: {exc}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return "error: number too large"
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: not a valid expression"
