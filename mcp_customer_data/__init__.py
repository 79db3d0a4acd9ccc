"""The ``customer-data`` MCP server (``fleet mcp serve``): the worker's only way to business data.

Five tools, no SQL tool: ``lookup_customer``, ``find_customer_by_email``, ``lookup_order``,
``find_similar_resolved_tickets`` and ``issue_refund`` (the only write). See
:mod:`mcp_customer_data.server` for the transport and auth, :mod:`mcp_customer_data.data` for
what each tool does to the database.
"""

from mcp_customer_data.server import TOOL_NAMES, build_server, create_app, serve

__all__ = ["TOOL_NAMES", "build_server", "create_app", "serve"]
