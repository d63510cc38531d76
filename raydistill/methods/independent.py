"""independent: every peer trains alone with the task loss, the baseline every result is compared with."""
from raydistill.methods.base import Method, register_method


@register_method("independent")
class Independent(Method):
    defaults = {**Method.defaults, "alpha": 0.0}
