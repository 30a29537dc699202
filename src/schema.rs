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
        keyword(root, key, value, &here)?;
    }
    bounds(object, at)
}

/// One keyword of a schema checked (its subschemas walked in turn).
fn keyword(root: &Value, key: &str, value: &Value, here: &str) -> Result<(), String> {
    match key {
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
        "items" | "additionalProperties" => walk(root, value, here)?,
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
        "required" if !value.is_array() => return Err(format!("{here} must be a list of names")),
        "enum" if value.as_array().is_none_or(|e| e.is_empty()) => {
            return Err(format!("{here} must be a list of values"))
        }
        "pattern" => {
            let Some(p) = value.as_str() else {
                return Err(format!("{here} must be a string"));
            };
            pattern(p).map_err(|e| format!("pattern {p:?} at {here}: {e}"))?;
        }
        "minLength" | "maxLength" | "minItems" | "maxItems" if !value.is_u64() => {
            return Err(format!("{here} must be a whole number, not {value}"))
        }
        "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !value.is_number() => {
            return Err(format!("{here} must be a number, not {value}"))
        }
        _ => {}
    }
    Ok(())
}

/// Lower bounds not above their upper bounds: else no value satisfies both.
fn bounds(object: &serde_json::Map<String, Value>, at: &str) -> Result<(), String> {
    for (low, high) in [
        ("minLength", "maxLength"),
        ("minItems", "maxItems"),
        ("minimum", "maximum"),
        ("exclusiveMinimum", "exclusiveMaximum"),
    ] {
        let bound = |k: &str| object.get(k).and_then(Value::as_f64);
        if let (Some(lo), Some(hi)) = (bound(low), bound(high)) {
            if lo > hi {
                return Err(format!(
                    "{low} {lo} is more than {high} {hi} at {at}: no value can satisfy both"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a `pattern` in the regular-expression dialect llama.cpp's converter
/// reads (anchored `^…$`; groups, classes, `|`, `* + ?`, `{m,n}`, escapes):
/// what it would turn into a grammar no text satisfies, or one that makes its
/// parser allocate without bound (`{3,1}`, see `crate::gbnf`), is an error
/// here. What the converter does not support it enforces as any string.
fn pattern(p: &str) -> Result<(), String> {
    let Some(inner) = p.strip_prefix('^').and_then(|p| p.strip_suffix('$')) else {
        return Ok(());
    };
    let s: Vec<char> = inner.chars().collect();
    let mut depth = 0usize;
    // Whether the last item can take a quantifier.
    let mut item = false;
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            '(' => {
                match (s.get(i + 1), s.get(i + 2)) {
                    (Some('?'), Some(':')) => i += 2,
                    // Lookarounds, named groups, flags: enforced as any string.
                    (Some('?'), _) => return Ok(()),
                    _ => {}
                }
                depth += 1;
                item = false;
                i += 1;
            }
            ')' => {
                depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?;
                item = true;
                i += 1;
            }
            '|' => {
                item = false;
                i += 1;
            }
            '*' | '+' | '?' if !item => return Err(format!("nothing to repeat before {:?}", s[i])),
            '*' | '+' | '?' => i += 1,
            '{' => {
                if !item {
                    return Err("nothing to repeat before {".into());
                }
                let close = s[i..].iter().position(|&c| c == '}');
                let Some(close) = close else {
                    return Ok(()); // Unsupported by the converter: any string.
                };
                let counts: String = s[i + 1..i + close].iter().collect();
                crate::gbnf::check_counts(&counts)?;
                i += close + 1;
            }
            '[' => {
                i = class(&s, i + 1)?;
                item = true;
            }
            '\\' if i + 1 == s.len() => return Err("trailing backslash".into()),
            '\\' => {
                i += 2;
                item = true;
            }
            _ => {
                i += 1;
                item = true;
            }
        }
    }
    if depth > 0 {
        return Err("unbalanced parentheses".into());
    }
    Ok(())
}

/// Checks a character class from just after its `[`; the index after its `]`.
fn class(s: &[char], mut i: usize) -> Result<usize, String> {
    let mut members = Vec::new();
    while i < s.len() && s[i] != ']' {
        if s[i] == '\\' {
            let hex = match s.get(i + 1) {
                Some('x') => 2,
                Some('u') => 4,
                _ => 0,
            };
            let digits: String = s.iter().skip(i + 2).take(hex).collect();
            let escaped = if hex > 0 {
                u32::from_str_radix(&digits, 16)
                    .ok()
                    .and_then(char::from_u32)
            } else {
                s.get(i + 1).copied()
            };
            members.push((escaped, true));
            i += 2 + hex;
        } else {
            members.push((Some(s[i]), false));
            i += 1;
        }
    }
    if i >= s.len() {
        return Err("unterminated character class".into());
    }
    // Ranges: a `-` (not escaped) between two members.
    for w in members.windows(3) {
        if let [(Some(from), _), (Some('-'), false), (Some(to), _)] = w {
            if to < from {
                return Err(format!(
                    "invalid range {}-{}: it ends before it starts",
                    from.escape_debug(),
                    to.escape_debug()
                ));
            }
        }
    }
    Ok(i + 1)
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
    fn patterns_of_the_converters_dialect_pass() {
        for p in [
            "^[a-zA-Z0-9_-]{1,8}$",
            "^(\\d{3})-\\d{4}$",
            "^(?:ab|cd)+x?$",
            "^[\\x00-\\x7F]*$",
            "^[-+]?[0-9]{2,}$",
            "no anchors (even [z-a]) are enforced as any string",
        ] {
            assert_eq!(pattern(p), Ok(()), "{p}");
        }
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
            (
                json!({"type": "string", "pattern": "^[z-a]$"}),
                "pattern \"^[z-a]$\" at #/pattern: invalid range z-a",
            ),
            (
                json!({"properties": {"c": {"type": "string", "pattern": "^a{3,1}$"}}}),
                "pattern \"^a{3,1}$\" at #/properties/c/pattern: the repetition {3,1} asks for at least 3 and at most 1",
            ),
            (json!({"pattern": "^(ab$"}), "pattern \"^(ab$\" at #/pattern: unbalanced parentheses"),
            (json!({"pattern": "^ab)$"}), "pattern \"^ab)$\" at #/pattern: unbalanced parentheses"),
            (json!({"pattern": "^[ab$"}), "pattern \"^[ab$\" at #/pattern: unterminated character class"),
            (json!({"pattern": "^*a$"}), "pattern \"^*a$\" at #/pattern: nothing to repeat"),
            (
                json!({"type": "string", "minLength": 5, "maxLength": 3}),
                "minLength 5 is more than maxLength 3 at #",
            ),
            (
                json!({"type": "array", "items": {"type": "integer", "minimum": 9, "maximum": 1}}),
                "minimum 9 is more than maximum 1 at #/items",
            ),
            (json!({"type": "string", "minLength": -1}), "#/minLength must be a whole number"),
            (json!({"enum": []}), "#/enum must be a list of values"),
        ] {
            let e = check(&schema, "p").unwrap_err();
            assert!(e.message.starts_with(said), "{schema}: {}", e.message);
        }
    }
}
