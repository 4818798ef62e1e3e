//! What the worker's standalone property tests share: a database of their own.

use sqlx::PgPool;
use uuid::Uuid;

/// A database of one test's own, migrated, dropped at the end. (`#[sqlx::test]` gives an async test
/// its own database; a proptest runner is synchronous and runs its cases on a runtime of its own.)
pub struct ScratchDatabase {
    admin: PgPool,
    name: String,
    pub pool: PgPool,
}

impl ScratchDatabase {
    pub async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
        let admin = PgPool::connect(&url).await.expect("the test server is reachable");
        let name = format!("monohook_model_{}", Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("a database is created");
        let mut options: sqlx::postgres::PgConnectOptions = url.parse().expect("a valid DATABASE_URL");
        options = options.database(&name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("the new database is reachable");
        worker::db::MIGRATOR.run(&pool).await.expect("migrations apply");
        Self { admin, name, pool }
    }

    pub async fn drop_it(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .execute(&self.admin)
            .await;
    }
}
