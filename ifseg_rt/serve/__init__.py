"""Serving on NVIDIA Triton Inference Server: ``python -m ifseg_rt serve`` (a Triton around one exported model),
:class:`Client` (results as ``Segmenter.seg`` gives them, over HTTP or gRPC) and the Triton model-repository
export (``python -m ifseg_rt.export ... --format triton``).

================  ================================================================================
module            what
================  ================================================================================
``protocol``      the contract: tensor names, config parameters, limits, request decoding / packing
``client``        :class:`Client`, :class:`ServeError`
``server``        :func:`serve`, :func:`start_server` (validate the model, write the repository, run Triton)
``tritonserver``  :class:`TritonServer`: the tritonserver bundled with nvidia-pytriton as a child process
``front``         the HTTP front on the public HTTP / metrics ports: KServe checks (400), body limit, drain
``repository``    config.pbtxt built and validated with Triton's schema; serving and exported repositories
``triton_models`` the python-backend models that run inside Triton (imported by the repositories' model.py)
``telemetry``     the ifseg_* Prometheus metrics of those models, the worker-health file, the refusal log
``adaptation``    adapt on request: :class:`AdaptService` (jobs, worker processes, hot loading), its control socket
================  ================================================================================

Needs the ``[serve]`` extra (nvidia-pytriton, tritonclient); never torch, unless the torch backend is chosen.
Importing this package is cheap: the names below are resolved on first use.
"""

from importlib import import_module as _import_module

_LAZY = {
    "Client": "ifseg_rt.serve.client",
    "ServeError": "ifseg_rt.serve.client",
    "encode_image": "ifseg_rt.serve.client",
    "serve": "ifseg_rt.serve.server",
    "start_server": "ifseg_rt.serve.server",
    "ServeOptions": "ifseg_rt.serve.server",
    "TritonServer": "ifseg_rt.serve.tritonserver",
    "ServerError": "ifseg_rt.serve.tritonserver",
    "export_repository": "ifseg_rt.serve.repository",
    "validate_repository": "ifseg_rt.serve.repository",
    "check_repository": "ifseg_rt.serve.repository",
    "RepositoryError": "ifseg_rt.serve.repository",
    "AdaptServiceOptions": "ifseg_rt.serve.adaptation",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ifseg_rt.serve' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
