//! JSON schemas rbee can enforce while sampling. llama.cpp's converter turns a
//! schema into a grammar but says only that it failed, so a schema is checked
//! here first, at the door, and a 400 names the keyword it cannot enforce and
//! where it is. Annotations (titles, descriptions, examples) are ignored, as
//! validators do.

use crate::protocol::ApiError;
use serde_json::Value;

/// Keywords the grammar enforces.
const ENFORCED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// Keywords that say what a value is about, not what it may be.
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
    "discriminator",
];

const TYPES: &[&str] = &[
    "string", "number", "integer", "boolean", "null", "object", "array",
];
const FORMATS: &[&str] = &["date", "time", "date-time", "uuid"];

/// Checks `schema` (the `param` of the request) is one rbee can enforce.
pub fn check(schema: &Value, param: &str) -> Result<(), ApiError> {
    walk(schema, schema, "#").map_err(|m| ApiError::invalid(param, m))
}

fn walk(root: &Value, schema: &Value, at: &str) -> Result<(), String> {
    let object = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("the schema at {at} is not an object")),
    };
    for (key, value) in object {
        let here = format!("{at}/{key}");
        if ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        if !ENFORCED.contains(&key.as_str()) {
            return Err(format!(
                "{key:?} (at {at}) is not supported in a schema rbee enforces; \
                 supported: {}",
                ENFORCED.join(", ")
            ));
        }
        match key.as_str() {
            "type" => {
                let names: Vec<&Value> = match value {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                for n in names {
                    if !n.as_str().is_some_and(|t| TYPES.contains(&t)) {
                        return Err(format!("unknown type {n} at {here}"));
                    }
                }
            }
            "properties" | "$defs" | "definitions" => {
                let Some(map) = value.as_object() else {
                    return Err(format!("{here} must be an object of schemas"));
                };
                for (name, sub) in map {
                    walk(root, sub, &format!("{here}/{name}"))?;
                }
            }
            "items" | "additionalProperties" => walk(root, value, &here)?,
            "prefixItems" | "anyOf" | "oneOf" | "allOf" => {
                let Some(list) = value.as_array().filter(|l| !l.is_empty()) else {
                    return Err(format!("{here} must be a list of schemas"));
                };
                for (i, sub) in list.iter().enumerate() {
                    walk(root, sub, &format!("{here}/{i}"))?;
                }
            }
            "$ref" => {
                let target = value.as_str().unwrap_or_default();
                if !(target.starts_with("#/$defs/") || target.starts_with("#/definitions/")) {
                    return Err(format!(
                        "only local references (#/$defs/… or #/definitions/…) are supported, not {value} at {here}"
                    ));
                }
                if resolve(root, target).is_none() {
                    return Err(format!("{target} (at {here}) names nothing in the schema"));
                }
            }
            "format" => {
                let f = value.as_str().unwrap_or_default();
                if !FORMATS.contains(&f) {
                    return Err(format!(
                        "format {f:?} at {here} is not supported; supported: {}",
                        FORMATS.join(", ")
                    ));
                }
            }
            "required" if !value.is_array() => {
                return Err(format!("{here} must be a list of names"))
            }
            "enum" if value.as_array().is_none_or(|e| e.is_empty()) => {
                return Err(format!("{here} must be a list of values"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The schema a local `#/…` pointer names.
fn resolve<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    root.pointer(pointer.strip_prefix('#')?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pydantic_schema_is_enforceable() {
        let schema = json!({
            "$defs": {"Step": {"properties": {"explanation": {"title": "Explanation", "type": "string"}},
                                "required": ["explanation"], "title": "Step", "type": "object"}},
            "properties": {
                "steps": {"items": {"$ref": "#/$defs/Step"}, "title": "Steps", "type": "array"},
                "answer": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null},
                "when": {"type": "string", "format": "date"}
            },
            "required": ["steps", "answer"],
            "title": "Solution",
            "type": "object",
            "additionalProperties": false
        });
        assert_eq!(check(&schema, "response_format"), Ok(()));
    }

    #[test]
    fn what_cannot_be_enforced_is_named_with_where_it_is() {
        let e = check(
            &json!({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
            "response_format",
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("response_format"));
        assert!(
            e.message
                .starts_with("\"not\" (at #/properties/a) is not supported"),
            "{}",
            e.message
        );
        for (schema, said) in [
            (
                json!({"type": "decimal"}),
                "unknown type \"decimal\" at #/type",
            ),
            (json!({"$ref": "https://x/y.json"}), "only local references"),
            (
                json!({"$ref": "#/$defs/Missing"}),
                "#/$defs/Missing (at #/$ref) names nothing",
            ),
            (
                json!({"type": "string", "format": "email"}),
                "format \"email\" at #/format",
            ),
            (json!([1]), "the schema at # is not an object"),
        ] {
            let e = check(&schema, "p").unwrap_err();
            assert!(e.message.starts_with(said), "{schema}: {}", e.message);
        }
    }
}
