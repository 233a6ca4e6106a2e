terraform {
  # 1.9+ is needed: variable validations below refer to other variables
  # (autoscaler min <= max, target size within the bounds).
  required_version = ">= 1.9"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.40, < 7.0"
    }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}
