"""User embeddings for PPD (Dang et al., CVPR 2025, arXiv 2501.06655): the id -> embedding table."""
from .table import USER_TABLE_NAME, UserTable, UserTableError, UnknownUserError, interpolate_users, select_layers

__all__ = ["USER_TABLE_NAME", "UserTable", "UserTableError", "UnknownUserError", "interpolate_users", "select_layers"]
