"""Model families trained by haillm."""
