// Upload progress on the images page: an enhancement only.  Without this
// script the form posts as usual; with it, the same form is sent by
// XMLHttpRequest and its upload events fill the progress bar.
"use strict";
(function () {
  var form = document.getElementById("upload");
  if (!form || !window.FormData || !window.XMLHttpRequest) {
    return;
  }
  var bar = document.getElementById("progress");
  var text = document.getElementById("progress-text");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var request = new XMLHttpRequest();
    request.open("POST", form.getAttribute("action"));
    request.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) {
        bar.hidden = false;
        bar.value = Math.floor(100 * e.loaded / e.total);
        text.textContent = bar.value + "% of " + e.total + " bytes";
      }
    });
    request.addEventListener("load", function () {
      if (request.status === 200) {
        // Stored: the list the server sent the browser on to, with its message.
        window.location.assign(request.responseURL || "/images");
        return;
      }
      // Refused: the message of the page the server answered.
      var page = new DOMParser().parseFromString(request.responseText, "text/html");
      var message = page.getElementById("message");
      text.textContent = message ? message.textContent : "the upload was refused";
      form.querySelector("button[type=submit]").disabled = false;
    });
    request.addEventListener("error", function () {
      text.textContent = "the upload failed: the connection was lost";
    });
    form.querySelector("button[type=submit]").disabled = true;
    request.send(new FormData(form));
  });
})();
