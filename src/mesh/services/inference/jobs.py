"""The job handler for model-only jobs (the inference queue): fetch the job's image, predict, return it.

The queue's worker runtime claims a job and calls :class:`InferenceJobHandler` with a
:class:`~mesh.kit.jobs.JobContext`. ``job.model`` names the model, optionally with a version as
``name/version`` (:class:`~mesh.kit.jobs.ModelReference`). Progress beats go out at each stage, so a cancel
is seen before the model runs. Errors are MeshErrors whose category decides retry: a missing image or model
is PERMANENT, an undecodable image DATA, a model that is not ready yet or a full queue TRANSIENT.
"""

from __future__ import annotations

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import FieldViolation, InvalidArgument
from mesh.kit.jobs import JobContext, ModelReference
from mesh.queue.v1 import job_pb2
from mesh.services.inference.predictor import Predictor


class InferenceJobHandler:
    """Runs one attempt of a model-only job (implements :class:`mesh.kit.jobs.JobHandler`)."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    async def __call__(self, context: JobContext) -> job_pb2.JobResult:
        job = context.job
        if not job.image_id:
            raise InvalidArgument(
                "the job names no image", field_violations=[FieldViolation("image_id", "must not be empty")]
            )
        model = ModelReference.parse(job.model)
        request = pb.PredictRequest(
            model_name=model.name,
            model_version=model.version,
            input=image_pb2.ImageInput(image_id=job.image_id),
            request_id=f"{job.id}/{job.attempt}",
        )
        prediction = await self._predictor.predict(request, on_stage=context.progress)
        await context.progress(1.0, "model")
        return job_pb2.JobResult(prediction=prediction)
