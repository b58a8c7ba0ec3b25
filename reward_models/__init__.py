from .base import Reward, available_rewards, get_reward, register  # noqa: F401
