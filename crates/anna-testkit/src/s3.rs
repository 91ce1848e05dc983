//! A real S3-compatible server on loopback for tests: `s3s-fs` (an S3 server over a
//! directory) with signature checking on, so requests and presigned URLs signed wrongly, or
//! used after they expire, are refused as a real bucket would refuse them.

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// A running S3 server with one bucket. Stops when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// The directory behind the server: `<root>/<bucket>/<key>` is an object.
    pub root: PathBuf,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Starts a server on a free loopback port, over a new directory, with a bucket `media`.
    pub async fn start() -> Self {
        let root = std::env::temp_dir().join(format!("anna-test-s3-{}", Uuid::new_v4()));
        let bucket = "media".to_owned();
        std::fs::create_dir_all(root.join(&bucket)).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let access_key = "anna-test-access".to_owned();
        let secret_key = format!("anna-test-secret-{}", Uuid::new_v4());
        let files = s3s_fs::FileSystem::new(&root).unwrap_or_else(|e| panic!("s3s-fs over {}: {e:?}", root.display()));
        let service = {
            let mut builder = S3ServiceBuilder::new(files);
            builder.set_auth(SimpleAuth::from_single(access_key.clone(), secret_key.clone()));
            builder.build()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind the S3 server: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("S3 server address: {e}"));
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            while let Ok((socket, _)) = listener.accept().await {
                let connection = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket,
            access_key,
            secret_key,
            region: "us-east-1".to_owned(),
            root,
            task,
        }
    }

    /// Where the object `key` lies on disk.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(&self.bucket).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
