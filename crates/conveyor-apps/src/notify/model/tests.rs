//! The model's unit tests.

use super::validate;
use serde_json::json;

#[test]
fn payload_schemas_name_the_failing_field() {
    let schema = json!({
        "type": "object", "required": ["order_id", "total"],
        "properties": {
            "order_id": {"type": "string", "minLength": 1},
            "total": {"type": "number", "minimum": 0},
            "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
            "tier": {"enum": ["gold", "silver"]}
        }
    });
    assert!(validate(&schema, &json!({"order_id": "A1", "total": 3.5}), "payload").is_ok());
    assert_eq!(validate(&schema, &json!({"order_id": "A1"}), "payload").unwrap_err().0, "payload.total");
    assert_eq!(
        validate(&schema, &json!({"order_id": 5, "total": 1}), "payload").unwrap_err(),
        ("payload.order_id".into(), "must be string".into())
    );
    assert_eq!(validate(&schema, &json!({"order_id": "A", "total": -1}), "payload").unwrap_err().1, "must be at least 0");
    assert_eq!(validate(&schema, &json!({"order_id": "A", "total": 1, "items": [{}]}), "payload").unwrap_err().0, "payload.items[0].sku");
    assert!(validate(&schema, &json!({"order_id": "A", "total": 1, "tier": "bronze"}), "payload").is_err());
}
