"""Reward models behind one interface; see base.py."""
from .base import Reward, available_rewards, get_reward, register

__all__ = ["Reward", "available_rewards", "get_reward", "register"]
