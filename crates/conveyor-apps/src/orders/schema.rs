//! The orders application's tables, in SQL both SQLite and PostgreSQL accept. Money is integer
//! cents. `products.stock` is what can still be sold; `reserved` is held by orders in flight.

pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE products (
    sku          TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    price_cents  BIGINT NOT NULL,
    stock        BIGINT NOT NULL,
    reserved     BIGINT NOT NULL DEFAULT 0,
    updated_at   BIGINT NOT NULL
);
CREATE TABLE customers (
    id     BIGINT PRIMARY KEY,
    name   TEXT NOT NULL,
    email  TEXT NOT NULL
);
CREATE TABLE orders (
    id           TEXT PRIMARY KEY,
    customer_id  BIGINT NOT NULL,
    status       TEXT NOT NULL,
    total_cents  BIGINT NOT NULL,
    order_date   TEXT NOT NULL,
    order_day    TEXT NOT NULL,
    workflow_id  TEXT,
    created_at   BIGINT NOT NULL,
    settled_at   BIGINT
);
CREATE INDEX orders_by_customer ON orders(customer_id, created_at);
CREATE INDEX orders_by_status ON orders(status, created_at);
CREATE INDEX orders_by_day ON orders(order_day, status);
CREATE INDEX orders_by_created ON orders(created_at);
CREATE TABLE order_items (
    order_id          TEXT NOT NULL,
    line              BIGINT NOT NULL,
    sku               TEXT NOT NULL,
    quantity          BIGINT NOT NULL,
    unit_price_cents  BIGINT NOT NULL,
    PRIMARY KEY (order_id, line)
);
CREATE TABLE stock_reservations (
    order_id    TEXT NOT NULL,
    sku         TEXT NOT NULL,
    quantity    BIGINT NOT NULL,
    status      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);
CREATE INDEX reservations_by_sku ON stock_reservations(sku, status);
CREATE TABLE payments (
    order_id         TEXT NOT NULL,
    status           TEXT NOT NULL,
    amount_cents     BIGINT NOT NULL,
    reference        TEXT,
    idempotency_key  TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (order_id, status)
);
-- The payment simulator's own ledger (what a real gateway keeps on its side): one charge per
-- idempotency key, so a retried or repeated charge returns the first one.
CREATE TABLE payment_gateway_charges (
    idempotency_key  TEXT PRIMARY KEY,
    reference        TEXT NOT NULL,
    amount_cents     BIGINT NOT NULL,
    status           TEXT NOT NULL,
    created_at       BIGINT NOT NULL
);
"#,
    // Nothing reads reservations by SKU (`products.reserved` holds what is reserved per SKU), and
    // with `status` in it every status change of a reservation also rewrote this index; on a
    // table grown from empty without statistics, PostgreSQL chose it for `status = 'reserved'`
    // and scanned every open reservation to settle a few orders.
    "DROP INDEX reservations_by_sku",
];
