"""Walking a functional Keras model's graph."""

from __future__ import annotations


def nodes_in_order(model) -> list:
    """The `(operation, node)` pairs a functional model computes, each after
    the nodes that feed it."""
    order, seen = [], set()

    def visit(tensor):
        operation, node_index, _ = tensor._keras_history
        key = (id(operation), node_index)
        if key in seen:
            return
        seen.add(key)
        node = operation._inbound_nodes[node_index]
        for parent in node.input_tensors:
            visit(parent)
        order.append((operation, node))

    for output in model.outputs:
        visit(output)
    return order


def consumers_of(order) -> dict[int, list]:
    """Maps `id(operation)` to the operations that read its output."""
    consumers: dict[int, list] = {}
    for operation, node in order:
        for parent in node.input_tensors:
            consumers.setdefault(id(parent._keras_history.operation), []).append(operation)
    return consumers


def producer(tensor):
    """The operation that computed a symbolic tensor."""
    return tensor._keras_history.operation
