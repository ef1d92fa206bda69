#!/usr/bin/env python3
"""Writes a products CSV and an orders CSV for benchmarks and soak runs.

usage: gen-orders.py OUT_DIR ORDERS [PRODUCTS] [STOCK_RATIO]
Orders have 1 to 3 lines; product stock covers STOCK_RATIO (default 0.6) of demand.
"""
import random
import sys

out, orders = sys.argv[1], int(sys.argv[2])
products = int(sys.argv[3]) if len(sys.argv) > 3 else 50
ratio = float(sys.argv[4]) if len(sys.argv) > 4 else 0.6
rnd = random.Random(42)
prices = {f"SKU-{i:04d}": rnd.randint(100, 20000) for i in range(products)}
demand = {s: 0 for s in prices}
rows = 0
with open(f"{out}/orders.csv", "w") as f:
    f.write("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n")
    for o in range(orders):
        c = rnd.randint(1, 5000)
        day = f"2026-11-{rnd.randint(1, 22):02d}T{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:00Z"
        for s in rnd.sample(sorted(prices), rnd.randint(1, 3)):
            q = rnd.randint(1, 3)
            demand[s] += q
            rows += 1
            f.write(f"ORD-{o:07d},{c},Customer {c},customer{c}@example.com,{s},{q},{prices[s] / 100:.2f},{day}\n")
with open(f"{out}/products.csv", "w") as f:
    f.write("sku,name,price,stock\n")
    for s, p in prices.items():
        f.write(f"{s},Product {s},{p / 100:.2f},{int(demand[s] * ratio)}\n")
print(f"{orders} orders, {rows} rows, {products} products in {out}", file=sys.stderr)
