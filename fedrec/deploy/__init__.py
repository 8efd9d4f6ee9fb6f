"""Deployment of federated training to data owners' PySyft 0.9 datasites (docs/deployment.md).

- :mod:`fedrec.deploy.owner`: a data owner's datasite (private asset + mock, guest sign-up off, random
  admin password, code approved by an owner policy pinning source digests; the owner's own ledger);
- :mod:`fedrec.deploy.guests`: the datasite's refusal of anonymous guest sessions, and its check;
- :mod:`fedrec.deploy.coordinator`: the round engine's datasite backend (public keys only);
- :mod:`fedrec.deploy.datasite`: the coordinator's session with one datasite, calls with deadlines;
- :mod:`fedrec.deploy.outputs`: the checks of datasite outputs before anything is aggregated;
- :mod:`fedrec.deploy.training`: what approved code runs on a datasite (the simulation's own steps);
- :mod:`fedrec.deploy.functions`: the syft functions (two-line wrappers) and their digests;
- :mod:`fedrec.deploy.policy`, :mod:`fedrec.deploy.keys`, :mod:`fedrec.deploy.sealed`,
  :mod:`fedrec.deploy.local` (N local owners for scripts/deploy_syft.py and the tests).

PySyft (slow to import, pins numpy) is imported only inside these modules' functions, never at
package import and never from the training or privacy paths.
"""
