"""Fair share and quotas: who may start a generation now.

admit() (admission.py) is called where a generation is admitted; it checks the token budgets
(quota.py), takes a concurrency lease every instance sees (leases.py) and waits for this
instance's fair gate (fair.py). Refusals are AccessRefused: 429 with Retry-After.
"""

from app.access.admission import AccessControl, Admission, AdmittedStream, admit
from app.access.errors import AccessRefused

__all__ = ["AccessControl", "AccessRefused", "Admission", "AdmittedStream", "admit"]
