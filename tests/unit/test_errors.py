"""Error mapping to OpenAI's shape."""

from lnarize_serve.errors import GENERIC_500_MESSAGE, error_body, error_type_for, validation_message


def test_error_body_has_the_openai_shape():
    body = error_body(400, "bad temperature", "temperature")
    assert body == {"error": {"message": "bad temperature", "type": "BadRequestError", "param": "temperature", "code": 400}}


def test_error_types_match_vllm_naming():
    assert error_type_for(400) == "BadRequestError"
    assert error_type_for(401) == "AuthenticationError"
    assert error_type_for(404) == "NotFoundError"
    assert error_type_for(413) == "RequestTooLargeError"
    assert error_type_for(503) == "ServiceUnavailableError"
    assert error_type_for(500) == "InternalServerError"
    assert error_type_for(429) == "TooManyRequestsError"


def test_validation_message_names_the_field_and_drops_pydantic_internals():
    errors = [
        {"loc": ("body", "function-wrap[__log_extra_fields__()]", "temperature"), "msg": "Input should be a valid number"},
        {"loc": ("body", "messages"), "msg": "Field required"},
    ]
    message, param = validation_message(errors)
    assert message == "body.temperature: Input should be a valid number; body.messages: Field required"
    assert param == "temperature"


def test_validation_message_accepts_plain_strings():
    message, param = validation_message(["Unsupported Media Type: Only 'application/json' is allowed"])
    assert "Unsupported Media Type" in message and param is None


def test_generic_500_message_carries_only_an_id():
    text = GENERIC_500_MESSAGE.format(error_id="abc123")
    assert "abc123" in text and "Traceback" not in text


def test_invalid_json_names_no_bogus_parameter():
    message, param = validation_message(
        [{"type": "json_invalid", "loc": ("body", 10), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}]
    )
    assert message == "the body is not valid JSON (Expecting value)"
    assert param is None
